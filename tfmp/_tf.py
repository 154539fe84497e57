"""TensorFlow, for the modules that need it: imported on first use, with one clear error.

tfmp's core (`policies`, `optimizers`, `layers`, `normalization`, `losses`,
`convert`, `audit`, `callbacks`) runs on every Keras backend and never imports
TensorFlow at module level. `data`, `distribute`, `export` and `training` (the
recipes' loop) are TensorFlow only: they call `import_tensorflow(feature)`,
which returns the module or raises `ImportError` with one line naming what to
install.

Example:

    tf = _tf.import_tensorflow("tfmp.export")   # ImportError without TensorFlow
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

INSTALL_HINT = "pip install tensorflow (or pip install tfmp, which depends on it)"


def available() -> bool:
    """Whether TensorFlow can be imported (without importing it)."""
    if "tensorflow" in sys.modules:  # None: an import that is made to fail
        return sys.modules["tensorflow"] is not None
    return importlib.util.find_spec("tensorflow") is not None


def import_tensorflow(feature: str) -> ModuleType:
    """Returns the `tensorflow` module, or raises a one-line `ImportError`.

    Args:
        feature: what needs TensorFlow, named in the error (e.g. "tfmp.export").

    Returns:
        The imported `tensorflow` module.

    Raises:
        ImportError: TensorFlow is not installed; the message says what to install.
    """
    try:
        import tensorflow as tf
    except ImportError as e:  # ModuleNotFoundError, or a broken install.
        raise ImportError(f"{feature} needs TensorFlow, which is not installed here "
                          f"({e}): {INSTALL_HINT}") from None
    return tf
