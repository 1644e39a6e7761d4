"""Learning test: a tiny image+label MT-Diffusion model fits 256 real Fashion-MNIST images on CPU, and the
label-conditioned model generates the class it is given where the aggregation-only one does not.

The images are average-pooled 28 -> 14 pixels to keep the run near 90 s on 2 idle CPU cores (most of it XLA
compiles). Without the Debian IDX files, a synthetic fixture with the same shapes (10 noisy class templates) is used.
"""

import functools
import gzip
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmdiff_jax import diffusion
from mmdiff_jax.modalities import Modality, modality_schedule
from mmdiff_jax.models.mt_diffusion import MTDiffusion, init_variables
from mmdiff_jax.models.unet import unet_preset
from mmdiff_jax.objective import make_loss_fn
from mmdiff_jax.sampling import make_sample_fn

FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
NUM_EXAMPLES, SIZE = 256, 14
STEPS, BATCH_SIZE, LEARNING_RATE = 120, 32, 3e-3
UNET = unet_preset("tiny")


def _read_idx(path: pathlib.Path) -> np.ndarray:
    try:
        from mmdiff_jax.data.fashion_mnist import read_idx
    except ImportError:  # the data layer (or tensorflow-datasets) is absent: a minimal IDX reader
        with gzip.open(path, "rb") as f:
            data = f.read()
        dims = np.frombuffer(data, ">u4", data[3], offset=4)
        return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(dims)
    return read_idx(path)


def training_images(classes: tuple[int, ...], directory: pathlib.Path = FASHION_MNIST_DIR):
    """(images [256, 14, 14, 1] float32 in [-1, 1], labels [256] int32 in 0..K-1, source): the first 256
    training images of `classes`, relabelled in their order."""
    images_file = directory / "train-images-idx3-ubyte.gz"
    labels_file = directory / "train-labels-idx1-ubyte.gz"
    if images_file.is_file() and labels_file.is_file():
        images, labels = _read_idx(images_file)[:4000], _read_idx(labels_file)[:4000]
        keep = np.isin(labels, classes)
        images, labels = images[keep][:NUM_EXAMPLES], np.searchsorted(classes, labels[keep][:NUM_EXAMPLES])
        images = images.astype(np.float32) / 127.5 - 1.0
        images = images.reshape(NUM_EXAMPLES, SIZE, 2, SIZE, 2).mean(axis=(2, 4))[..., None]
        return images, labels.astype(np.int32), "Fashion-MNIST"
    rng = np.random.default_rng(0)
    templates = np.tanh(2 * rng.normal(size=(len(classes), SIZE // 2, SIZE // 2, 1))).repeat(2, 1).repeat(2, 2)
    labels = rng.integers(0, len(classes), NUM_EXAMPLES).astype(np.int32)
    images = np.clip(templates[labels] + 0.2 * rng.normal(size=(NUM_EXAMPLES, SIZE, SIZE, 1)), -1, 1)
    return images.astype(np.float32), labels, "synthetic"


def _train(loss_fn, params, data, key, steps=STEPS):
    """Adam on random batches of `data`; returns (params, training losses [steps], seconds with compilation)."""
    optimizer = optax.adam(LEARNING_RATE)

    # The 120 steps are the test's heaviest compute: this one program is built with XLA's default backend
    # optimisation (level 2) although the suite compiles without it (tests/conftest.py).
    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 2})
    def train_step(params, opt_state, rng):
        batch_rng, loss_rng = jax.random.split(rng)
        index = jax.random.choice(batch_rng, NUM_EXAMPLES, (BATCH_SIZE,), replace=False)
        loss, grads = jax.value_and_grad(lambda p: loss_fn(p, jax.tree.map(lambda x: x[index], data), loss_rng)[0])(
            params
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = optimizer.init(params), []
    start = time.time()
    for step in range(steps):
        params, opt_state, loss = train_step(params, opt_state, jax.random.fold_in(key, step))
        losses.append(loss)
    return jax.block_until_ready(params), np.asarray(losses), time.time() - start


def test_label_model_learns_and_conditioning_generates_the_given_class():
    """Three classes (trouser, sneaker, bag), 120 steps each, the same data and seed:
    - the aggregation-only model (label condition 'none') fits: training loss (mean of the first and of the
      last 10 steps) down >= 3x, its label head classifies noisy images (t = 10) far above chance;
    - label -> image agreement, judged by the nearest class mean of the training images: the model whose
      denoiser sees the label (condition 'embedding', guidance scale 4) against the aggregation-only one.
    (On all ten classes conditioning needs ~1000+ steps, beyond a unit test's budget.)"""
    classes = (1, 7, 8)
    images, labels, source = training_images(classes)
    data = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    centroids = np.stack([images[labels == k].mean(axis=0) for k in range(len(classes))]).reshape(len(classes), -1)
    given = jnp.arange(len(classes) * 16, dtype=jnp.int32) % len(classes)
    key = jax.random.key(0, impl="rbg")
    agreement = {}
    for condition in ("none", "embedding"):
        # The label's NLL is in nats per example while eps-MSE is per pixel: 0.25 keeps the terms comparable.
        modalities = (Modality("label", "label", num_classes=len(classes), loss_weight=0.25, condition=condition),)
        model = MTDiffusion(UNET, modalities, (SIZE, SIZE, 1))
        schedule = modality_schedule("linear", 1000, modalities)
        initial = jax.jit(lambda key, model=model: init_variables(model, key))(key)["params"]
        params, losses, train_time = _train(make_loss_fn(model, schedule), initial, data, key)
        if condition == "none":
            accuracy = _head_accuracy(model, schedule, data, key)
            accuracy_before, accuracy_after = accuracy(initial), accuracy(params)
            loss_before, loss_after = losses[:10].mean(), losses[-10:].mean()
            print(
                f"\n{source}, {STEPS} steps of batch {BATCH_SIZE} in {train_time:.0f} s (with compile): training "
                f"loss (mean of 10 steps) {loss_before:.3f} -> {loss_after:.3f} ({loss_before / loss_after:.1f}x); "
                f"label accuracy at t = 10: {float(accuracy_before):.2f} -> {float(accuracy_after):.2f} "
                "(chance 0.33)"
            )
        sample = make_sample_fn(model, schedule, num_steps=10)
        options = {"cfg_scales": 4.0} if condition != "none" else {}
        generated = np.asarray(sample(params, jax.random.key(1), {"label": given}, **options).image)
        distances = ((generated.reshape(len(given), 1, -1) - centroids[None]) ** 2).sum(axis=-1)
        agreement[condition] = float(np.mean(distances.argmin(axis=1) == np.asarray(given)))
    print(
        f"label -> image agreement (nearest class mean; chance 0.33): conditioned {agreement['embedding']:.2f}, "
        f"aggregation-only {agreement['none']:.2f}"
    )
    assert float(loss_before / loss_after) >= 3.0
    assert float(accuracy_after) >= 0.6
    assert agreement["embedding"] >= 0.7 and agreement["embedding"] >= agreement["none"] + 0.25


def _head_accuracy(model, schedule, data, key):
    @jax.jit
    def accuracy(params):
        """The label head's accuracy on all 256 training examples at t = 10 (z_t drawn from the image)."""
        t = jnp.full((NUM_EXAMPLES,), 10)
        encodings = model.apply({"params": params}, data, method=model.encode)
        noise = jax.random.normal(jax.random.fold_in(key, 2000), data["image"].shape)
        z_t = diffusion.marginal_sample(schedule, data["image"], t, noise, encodings=encodings)
        logits = model.apply({"params": params}, z_t, t, {}, method=model.predict).heads["label"]
        return jnp.mean(jnp.argmax(logits, axis=-1) == data["label"])

    return accuracy
