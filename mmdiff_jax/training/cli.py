"""Command-line plumbing shared by `python -m mmdiff_jax.train` and `python -m experiments.<name>`.

A mistake on the command line ends in one line on stderr that names the flag and what is wrong, and exit
status 2, before anything is compiled:

  error: --config.train.stepz=5: the config has no key 'stepz' (did you mean "steps"?)
  error: --workdir=/tmp/run.txt: /tmp/run.txt exists and is not a directory
  error: config.model.modalities.masked_image: modality 'masked_image': unknown condition 'concatt'; ...

(the last: a value the config's validation refuses, `config_io.ConfigError`, before any compilation).

With the environment variable MMDIFF_DEBUG=1 the error is raised instead, with its traceback.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import app, flags

DEBUG_VARIABLE = "MMDIFF_DEBUG"


class CommandLineError(Exception):
    """A mistake in the command line; the message names the flag."""


def _innermost_message(error: BaseException) -> str:
    """The text of an error whose first argument may itself be an error (ml_collections wraps a KeyError
    holding the did-you-mean hint in an AttributeError), on one line."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    message = str(error.args[0]) if error.args else str(error)
    return " ".join(message.split())


def _override_error(error: BaseException) -> str:
    """'--config.a.b=v: the config has no key 'b' (did you mean ...)' for ml_collections' unknown-key error;
    the flag is found in sys.argv (where ml_collections reads the overrides)."""
    message = _innermost_message(error)
    key = re.match(r"'([^']+)'", message)
    hint = re.search(r'Did you mean "([^"]+)"', message)
    if key is None:
        return f"a --config override: {message}"
    overrides = [arg for arg in sys.argv[1:] if arg.startswith("--") and "." in arg.split("=")[0]]
    flag = next((arg for arg in overrides if key.group(1) in arg.split("=")[0].split(".")[1:]), None)
    where = flag or "a --config override"
    return f"{where}: the config has no key '{key.group(1)}'" + (f' (did you mean "{hint.group(1)}"?)' if hint else "")


@contextlib.contextmanager
def _as_command_line_errors() -> Iterator[None]:
    """Raises absl's flag errors and ml_collections' unknown-key errors as CommandLineError."""
    try:
        yield
    except flags.Error as error:
        raise CommandLineError(_innermost_message(error)) from error
    except (AttributeError, KeyError) as error:  # ml_collections: an override names no config field
        raise CommandLineError(_override_error(error)) from error


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """A CommandLineError or ConfigError raised inside is printed as one line on stderr, exit status 2; an error
    that stops a run (`CheckpointMismatchError`: a workdir of another model; `NonFiniteLossError`) is printed
    with its name and lines, exit status 1. With MMDIFF_DEBUG=1 either propagates with its traceback."""
    from mmdiff_jax.training.config_io import ConfigError  # the heavy imports only where a run needs them

    debug = os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    try:
        yield
    except (CommandLineError, ConfigError) as error:
        if debug:
            raise
        sys.stderr.write(f"error: {error}  ({DEBUG_VARIABLE}=1 shows the traceback)\n")
        sys.exit(2)
    except Exception as error:
        if debug or not _stops_the_run(error):
            raise
        sys.stderr.write(f"error: {type(error).__name__}: {error}\n({DEBUG_VARIABLE}=1 shows the traceback)\n")
        sys.exit(1)


def _stops_the_run(error: Exception) -> bool:
    """Whether `error` is one of the trainer's run-stopping errors (only a run that imported them raises them)."""
    if "mmdiff_jax.training.loop" not in sys.modules:
        return False
    from mmdiff_jax.training import CheckpointMismatchError, NonFiniteLossError

    return isinstance(error, (CheckpointMismatchError, NonFiniteLossError))


@contextlib.contextmanager
def defining_flags() -> Iterator[None]:
    """Around flag definitions: a `--config` flag defined with a default file parses the `--config.x=y`
    overrides right there, before `run`; their mistakes are reported as by `run`."""
    with reported(), _as_command_line_errors():
        yield


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing (the `flags_parser` of `app.run`); raises CommandLineError for an unknown flag, a
    bad value or a `--config.x=y` override of a key the config does not have."""
    with _as_command_line_errors():
        return flags.FLAGS(list(argv))


def check_directory_flag(name: str, value: str) -> None:
    """CommandLineError unless flag `--name=value` can be a directory: one already, or a path whose deepest
    existing part is a directory (it is created later)."""
    path = pathlib.Path(value)
    existing = next((part for part in (path, *path.parents) if part.exists()), None)
    if existing is not None and not existing.is_dir():
        raise CommandLineError(f"--{name}={value}: {existing} exists and is not a directory")


def config_value(config_flag) -> Any:
    """The parsed `--config` of a config-file flag. A preset is picked one way, `--config=FILE:preset`
    (`get_config(preset)`): an override `--config.preset=X` would change that key alone and leave the config
    at the file's preset, so it is a CommandLineError that says how to pick X."""
    from ml_collections import config_flags

    config = config_flag.value
    path, _, built_with = config_flags.get_config_filename(config_flag).partition(":")
    if "preset" in config and config.preset != built_with:
        raise CommandLineError(
            f"--config.preset={config.preset}: a preset is picked with "
            f"--config={path}:{config.preset} (the override changes that key alone)"
        )
    return config


def run(main: Callable[[list[str]], None]) -> None:
    """`app.run(main)` with `parse_flags`; a CommandLineError, from parsing or raised by `main` (e.g. by
    `check_directory_flag`), is `reported`."""
    with reported():
        app.run(main, flags_parser=parse_flags)
