"""What tfmp's command-line tools share: safe loading of users' model files, one-line errors.

Example:

    with tfmp.cli.one_line_errors():
        model = tfmp.cli.load_keras_file(path, argument="model")
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
import zipfile
from collections.abc import Iterator

import keras


def check_keras_file(path: str, *, argument: str = "model") -> None:
    """Raises `ValueError` unless `path` is a file holding a `.keras` (zip) archive."""
    if not os.path.isfile(path):
        raise ValueError(f"`{argument}` is not a file. Received: {argument}={path!r}")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"`{argument}` is not a `.keras` zip archive. Received: {argument}={path!r}")


def load_keras_file(path: str, *, argument: str = "model", compile: bool = False) -> keras.Model:
    """Loads a user's `.keras` file with Keras' `safe_mode` on (no code runs from the file).

    Args:
        path: The `.keras` file.
        argument: The argument or flag name to quote in errors.
        compile: Whether to restore the training configuration too.

    Returns:
        The model.

    Raises:
        ValueError: For a missing or non-archive file, or one Keras refuses in safe mode.
    """
    check_keras_file(path, argument=argument)
    try:
        with warnings.catch_warnings():  # "Skipping variable loading for optimizer ..."
            warnings.simplefilter("ignore", UserWarning)
            return keras.saving.load_model(path, safe_mode=True, compile=compile)
    except Exception as e:
        raise ValueError(
            f"could not load `{argument}` as a Keras model in safe mode "
            f"({type(e).__name__}: {e}). Received: {argument}={path!r}") from e


@contextlib.contextmanager
def one_line_errors(exit_code: int = 1) -> Iterator[None]:
    """Reports any exception raised inside as one `error: ...` line on stderr and exits.

    Args:
        exit_code: The non-zero exit status.
    """
    try:
        yield
    except Exception as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(exit_code)
