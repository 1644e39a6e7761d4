"""Suite-wide settings: XLA's backend (LLVM) optimisations off and its classic CPU fusion emitters, for this
process and every child (`training_helpers.FAST_COMPILE`). The suite is bound by compile time, not run time:
on this project's 2-core CPU, tests/test_conditioning.py took 164 s with the default optimisation level and
91 s without; the compute-heavier learning test 91 s vs 104 s; the classic emitters then halve the compile
of a train step again. The programs compute the same functions (XLA:CPU does not use fast-math either way);
only their speed differs.

One persistent compilation cache serves the whole session (every xdist worker and child process inherits
`JAX_COMPILATION_CACHE_DIR` from the controller): a program compiled by one test loads in the next, e.g. a
comparator's tiny U-Net in two experiments. It is a fresh directory, removed at the end, so every run of the
suite compiles from scratch (a user's own JAX_COMPILATION_CACHE_DIR is kept)."""

import os
import shutil
import tempfile

import pytest

from tests.training_helpers import FAST_COMPILE

if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def pytest_configure(config):
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller (workers inherit it)
        config.stash[_CACHE] = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmdiff_jax_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
    if _CACHE in config.stash:
        shutil.rmtree(config.stash[_CACHE], ignore_errors=True)


_CACHE = pytest.StashKey[str]()
