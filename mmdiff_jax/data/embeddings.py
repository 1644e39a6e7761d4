"""Embedding tables for the `embedding(path)` transform: a user .npz, or an offline default for Fashion-MNIST.

User embeddings: an .npz with one [N, D] float array per split, keys "train"
and "test", row i belonging to example i of the split (the IDX file order,
which `fashion_mnist_debian` keeps). Checked once on load: shape, row count,
NaN/Inf (naming the first bad row).

Offline default, trained in the project (`ensure_default_embeddings`): a small
CNN classifier (conv 8 3x3/2 -> conv 16 3x3/2 -> dense D -> GELU -> dense 10,
~52k parameters) trained with AdamW (lr 2e-3, batch 128, 600 steps = 1.3
epochs, seed 0) on the train split; its penultimate layer (the D = 64
pre-activations of the dense-D layer) is the embedding. Embeddings are
standardised per dimension with the train-split mean and std, so both splits
share one scale. Training plus embedding the 70k images takes about 10 s on 2 free CPU
cores (10-20 s); test accuracy is ~87% (recorded in the file's "meta" with the
settings). The result is cached as `embeddings.npz` in the prepared dataset's
directory (`<data_dir>/fashion_mnist_debian/1.0.0/embeddings.npz`) and reused;
delete it to retrain.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmdiff_jax.data import checks
from mmdiff_jax.data import fashion_mnist

DEFAULT_EMBEDDING_DIM = 64
DEFAULT_STEPS = 600


class EmbeddingEncoder(nn.Module):
    """Tiny CNN classifier; `embed` gives its penultimate layer.

    images: [B, 28, 28, 1] float32 in [-1, 1] -> embedding [B, D], logits [B, 10].
    `__call__` returns both; `embed` only the embedding.
    """

    embedding_dim: int = DEFAULT_EMBEDDING_DIM
    num_classes: int = fashion_mnist.NUM_CLASSES

    def setup(self):
        self.conv1 = nn.Conv(8, (3, 3), strides=2)
        self.conv2 = nn.Conv(16, (3, 3), strides=2)
        self.embedding = nn.Dense(self.embedding_dim)
        self.classifier = nn.Dense(self.num_classes)

    def embed(self, images):
        hidden = nn.gelu(self.conv1(images))
        hidden = nn.gelu(self.conv2(hidden))
        return self.embedding(hidden.reshape(hidden.shape[0], -1))

    def __call__(self, images):
        """Returns (embedding [B, D], logits [B, 10])."""
        embedding = self.embed(images)
        return embedding, self.classifier(nn.gelu(embedding))


def _scaled(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 127.5 - 1


def _lecun_normal_params(model: nn.Module, image_shape, seed: int):
    """Flax's default init (LeCun-normal kernels, zero biases), drawn by numpy.

    `model.init` compiles threefry random ops, which takes ~10 s with XLA:CPU
    on this project's machines; the encoder's 52k numbers take milliseconds.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + tuple(image_shape)))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if len(leaf.shape) < 2:
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree.map(draw, shapes)


def train_embedding_encoder(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    embedding_dim: int = DEFAULT_EMBEDDING_DIM,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    seed: int = 0,
):
    """Trains `EmbeddingEncoder` on uint8 images [N, 28, 28, 1] and labels [N].

    Returns:
      (model, params).
    """
    model = EmbeddingEncoder(embedding_dim)
    params = _lecun_normal_params(model, images.shape[1:], seed)
    optimizer = optax.adamw(learning_rate)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, batch_images, batch_labels):
        def loss_fn(params):
            _, logits = model.apply(params, batch_images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    order = np.random.default_rng(seed)
    indices = np.concatenate([order.permutation(len(images)) for _ in range(-(-steps * batch_size // len(images)))])
    for step in range(steps):
        batch = indices[step * batch_size : (step + 1) * batch_size]
        params, opt_state = train_step(params, opt_state, _scaled(images[batch]), labels[batch].astype(np.int32))
    return model, params


def embed_images(
    model: EmbeddingEncoder, params, images: np.ndarray, batch_size: int = 2000
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 28, 28, 1] -> (embeddings [N, D] float32, predictions [N])."""

    @jax.jit
    def apply(images):
        embedding, logits = model.apply(params, images)
        return embedding, jnp.argmax(logits, -1)

    outputs = [apply(_scaled(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return (
        np.concatenate([np.asarray(e) for e, _ in outputs]),
        np.concatenate([np.asarray(p) for _, p in outputs]),
    )


def default_embeddings_path(data_dir=None, idx_dir=None) -> pathlib.Path:
    builder = fashion_mnist.prepare_fashion_mnist(data_dir, idx_dir)
    return pathlib.Path(os.fspath(builder.data_dir)) / "embeddings.npz"


def ensure_default_embeddings(
    data_dir=None,
    idx_dir=None,
    *,
    embedding_dim: int = DEFAULT_EMBEDDING_DIM,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
) -> pathlib.Path:
    """Path of the cached default embeddings, training the encoder if absent."""
    path = default_embeddings_path(data_dir, idx_dir)
    if path.exists():
        return path
    start = time.perf_counter()
    train = fashion_mnist.load_fashion_mnist("train", data_dir, idx_dir)
    test = fashion_mnist.load_fashion_mnist("test", data_dir, idx_dir)
    model, params = train_embedding_encoder(
        train["image"], train["label"], embedding_dim=embedding_dim, steps=steps, seed=seed
    )
    train_embedding, _ = embed_images(model, params, train["image"])
    test_embedding, predictions = embed_images(model, params, test["image"])
    mean = train_embedding.mean(0)
    std = train_embedding.std(0) + 1e-6
    meta = {
        "encoder": "EmbeddingEncoder",
        "embedding_dim": embedding_dim,
        "steps": steps,
        "batch_size": 128,
        "seed": seed,
        "test_accuracy": float(np.mean(predictions == test["label"])),
        "seconds": round(time.perf_counter() - start, 1),
    }
    temporary = path.with_name(f"embeddings.{os.getpid()}.tmp.npz")
    np.savez(
        temporary,
        train=((train_embedding - mean) / std).astype(np.float32),
        test=((test_embedding - mean) / std).astype(np.float32),
        meta=np.array(json.dumps(meta)),
    )
    os.replace(temporary, path)  # atomic: readers never see a partial file
    return path


def load_embeddings(path: str | os.PathLike, split: str, num_examples: int) -> np.ndarray:
    """The [num_examples, D] float32 embeddings of `split` from an .npz file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {path} does not exist")
    with np.load(path, allow_pickle=False) as data:
        if split not in data:
            raise KeyError(
                f"{path} has no {split!r} array (has "
                f"{sorted(data.files)}); expected one [N, D] array per "
                "split, aligned by example index"
            )
        embeddings = np.asarray(data[split], np.float32)
    checks.check_embeddings(embeddings, f"{path.name}[{split!r}]", num_examples)
    embeddings.flags.writeable = False
    return embeddings


def embedding_dim(path: str | os.PathLike) -> int:
    """D of an embedding file's tables (read from the train table's header, not the data)."""
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"embedding file {path} does not exist")
    with np.load(path, allow_pickle=False) as data:
        name = "train" if "train" in data.files else data.files[0]
        shape = data[name].shape
    if len(shape) != 2:
        raise checks.BadExampleError(f"{path}[{name!r}]: embeddings have shape {shape}, expected [N, D]")
    return int(shape[1])


def embeddings_meta(path: str | os.PathLike) -> dict:
    """The training record stored with the default embeddings ({} if none)."""
    with np.load(path, allow_pickle=False) as data:
        return json.loads(str(data["meta"])) if "meta" in data else {}
