"""Data: a source (where examples come from) and transforms (what the model reads), on grain pipelines.

Entry point:

  it = make_dataset("fashion_mnist()", "train", batch_size=128, seed=0,
                    transforms="pad(32)|value_range(-1, 1)|masked_image(kind='pixel', ratio=0.5)")
  batch = next(it)      # {"image", "masked_image", "mask", "label"}: [128, 32, 32, 1] ...
  state = it.get_state()  # JSON-serialisable; it.set_state(state) resumes
  it.close()            # its threads / workers (or `with make_dataset(...) as it:`; else done at exit)

Modules: `sources` (fashion_mnist(), tfds(name), folder(path), arrays(path): `config.data.source`),
`transforms` (resize, pad, value_range, masked_image, low_resolution, embedding, segmentation, scenes, keep:
`config.data.transforms`), `calls` (how those strings parse), `spec` (what an example holds, known before
reading), `pipeline` (grain), `checks` (bad-data errors), `fashion_mnist` (TFDS builder from Debian's IDX
files), `embeddings` (user tables or the offline default encoder), `scenes` (multi-object composition).
"""

from mmdiff_jax.data.checks import BadExampleError
from mmdiff_jax.data.embeddings import ensure_default_embeddings
from mmdiff_jax.data.embeddings import load_embeddings
from mmdiff_jax.data.fashion_mnist import FashionMnistDebian
from mmdiff_jax.data.fashion_mnist import load_fashion_mnist
from mmdiff_jax.data.fashion_mnist import prepare_fashion_mnist
from mmdiff_jax.data.pipeline import DataIterator
from mmdiff_jax.data.pipeline import as_source
from mmdiff_jax.data.pipeline import close_iterators
from mmdiff_jax.data.pipeline import dataset_spec
from mmdiff_jax.data.pipeline import make_dataset
from mmdiff_jax.data.pipeline import make_map_dataset
from mmdiff_jax.data.sources import InMemory
from mmdiff_jax.data.spec import DatasetSpec
from mmdiff_jax.data.transforms import TransformError
