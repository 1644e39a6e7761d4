"""User-given pretrained weights (LPIPS' VGG-16, FID's Inception-V3) as flat .npz files: check, save, load.

A converted file holds a Flax variable tree flattened with "/" ("params/conv1_1/kernel", ...), float32.
Nothing is downloaded: the user converts the official weights once (`convert_*_weights`).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def cache_path(environment_variable: str, file_name: str) -> pathlib.Path:
    """$environment_variable, else ~/.cache/mmdiff_jax/<file_name>."""
    return pathlib.Path(
        os.environ.get(environment_variable) or pathlib.Path.home().joinpath(".cache", "mmdiff_jax", file_name)
    )


def check_flat_params(
    flat: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    network: str,
    source: str,
    unexpected: Sequence[str] = (),
) -> None:
    """Raises one ValueError listing every missing, unexpected (also `unexpected`) or mis-shaped weight."""
    problems = [f"missing {k} {v}" for k, v in expected.items() if k not in flat]
    problems += [f"unexpected {k}" for k in [*unexpected, *(k for k in flat if k not in expected)]]
    problems += [
        f"{k}: shape {tuple(np.shape(v))}, expected {expected[k]}"
        for k, v in flat.items()
        if k in expected and tuple(np.shape(v)) != expected[k]
    ]
    if problems:
        raise ValueError(f"weights from {source} do not match the {network}:\n  " + "\n  ".join(problems))


def save_flat(flat: Mapping[str, np.ndarray], path) -> pathlib.Path:
    """Writes the .npz atomically (a concurrent reader sees all or nothing); returns its path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(temporary, **{k: np.asarray(v, np.float32) for k, v in flat.items()})
    os.replace(temporary, path)
    return path


def load_tree(path: pathlib.Path, missing_message: str, check: Callable[[dict[str, np.ndarray], str], None]) -> dict:
    """The converted .npz at `path`, checked by check(flat, source), as a nested tree of jax arrays;
    FileNotFoundError(missing_message) when there is none."""
    if not path.is_file():
        raise FileNotFoundError(missing_message)
    with np.load(path, allow_pickle=False) as data:
        flat = {k: data[k] for k in data.files}
    check(flat, str(path))
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")
