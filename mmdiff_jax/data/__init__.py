"""Data: offline Fashion-MNIST (TFDS builder), derived multi-modal sets, real TFDS sets, grain pipelines.

Entry point:

  it = make_dataset("fashion_mnist_masked", "train", batch_size=128, seed=0,
                    mask_kind="pixel", mask_ratio=0.5)
  batch = next(it)      # {"image", "masked_image", "mask"}: [128, 32, 32, 1]
  state = it.get_state()  # JSON-serialisable; it.set_state(state) resumes
  it.close()            # its threads / workers (or `with make_dataset(...) as it:`; else done at exit)

Modules: `fashion_mnist` (TFDS builder from Debian's IDX files), `derived`
(the derived sets as seeded per-example transforms), `embeddings` (user .npz
or the offline default encoder), `tfds_sets` (cifar10, imagenet2012,
downsampled_imagenet/64x64, oxford_iiit_pet through `tfds.data_source`),
`catalog` (the named sets, their options and fields), `pipeline` (grain),
`checks` (bad-data errors).
"""

from mmdiff_jax.data.catalog import DatasetSpec
from mmdiff_jax.data.catalog import KNOWN_DATASETS
from mmdiff_jax.data.catalog import dataset_spec
from mmdiff_jax.data.checks import BadExampleError
from mmdiff_jax.data.embeddings import ensure_default_embeddings
from mmdiff_jax.data.embeddings import load_embeddings
from mmdiff_jax.data.fashion_mnist import FashionMnistDebian
from mmdiff_jax.data.fashion_mnist import load_fashion_mnist
from mmdiff_jax.data.fashion_mnist import prepare_fashion_mnist
from mmdiff_jax.data.pipeline import DataIterator
from mmdiff_jax.data.pipeline import close_iterators
from mmdiff_jax.data.pipeline import make_dataset
from mmdiff_jax.data.pipeline import make_map_dataset
