"""The offline default embeddings (tiny encoder on a synthetic prepared set)."""

import numpy as np
import pytest

from mmdiff_jax import data
from mmdiff_jax.data import embeddings
from tests.test_data_fixtures import synthetic_data_dir  # noqa: F401


@pytest.fixture(scope="module")
def default_path(synthetic_data_dir):  # noqa: F811
    data_dir, idx_dir = synthetic_data_dir
    return embeddings.ensure_default_embeddings(data_dir, idx_dir, steps=60, embedding_dim=16)


def test_default_embeddings_file(default_path, synthetic_data_dir):  # noqa: F811
    data_dir, _ = synthetic_data_dir
    assert default_path.name == "embeddings.npz"
    assert default_path.parent.name == "1.0.0"  # next to the prepared data
    assert default_path.is_relative_to(data_dir)
    meta = embeddings.embeddings_meta(default_path)
    assert meta["steps"] == 60 and meta["embedding_dim"] == 16
    assert meta["test_accuracy"] > 0.3  # learned something (chance: 0.1)
    train = embeddings.load_embeddings(default_path, "train", 300)
    test = embeddings.load_embeddings(default_path, "test", 60)
    assert train.shape == (300, 16) and test.shape == (60, 16)
    assert train.dtype == np.float32
    np.testing.assert_allclose(train.mean(0), 0, atol=1e-4)  # standardised
    np.testing.assert_allclose(train.std(0), 1, atol=1e-3)
    # Reused, not retrained: a second call returns the same unchanged file.
    mtime = default_path.stat().st_mtime_ns
    assert embeddings.ensure_default_embeddings(data_dir) == default_path
    assert default_path.stat().st_mtime_ns == mtime


def test_embedding_dataset_uses_the_default(
    default_path,  # noqa: F811
    synthetic_data_dir,
):
    data_dir, _ = synthetic_data_dir
    table = embeddings.load_embeddings(default_path, "test", 60)
    with pytest.raises(ValueError, match=r"embedding\(\) without a path uses the project's Fashion-MNIST"):
        data.make_dataset(
            data.InMemory({"test": {"image": np.zeros((2, 4, 4, 1), np.uint8)}}),
            "test",
            transforms="embedding()",
            batch_size=2,
            seed=0,
        )
    iterator = data.make_dataset(
        f"fashion_mnist(idx_dir={str(synthetic_data_dir[1])!r})",
        "test",
        transforms="value_range()|embedding()",
        batch_size=20,
        seed=0,
        shuffle=False,
        num_epochs=1,
        data_dir=data_dir,
    )
    got = np.concatenate([batch["embedding"] for batch in iterator])
    np.testing.assert_array_equal(got, table)
    # Same class -> closer embeddings than different classes, on average.
    labels = np.arange(60) % 10
    distances = np.linalg.norm(table[:, None] - table[None], axis=-1)
    same = labels[:, None] == labels[None]
    np.fill_diagonal(same, False)
    different = labels[:, None] != labels[None]
    assert distances[same].mean() < distances[different].mean()
