"""What a recipe or tool does before TensorFlow is imported: keep its native start-up quiet.

TensorFlow's C++ start-up lines (`failed call to cuInit`, `cpu_feature_guard`,
oneDNN, "All log messages before absl::InitializeLog() ...") go straight to file
descriptor 2 whatever `TF_CPP_MIN_LOG_LEVEL` says (TensorFlow 2.21). When a
program is started with `python -m recipes.<name>` or `python -m tools.<name>`,
the package's `__init__` calls `quiet_tensorflow_startup()`, which imports
TensorFlow and finds its devices with descriptor 2 sent to a temporary file.
What was written there is dropped, or replayed on stderr if the import fails
(the program's own import then reports the error in one line).
`--verbose` (or `TFMP_VERBOSE=1`) leaves it all on stderr. This module imports
nothing of tfmp's (whose import loads Keras, and so TensorFlow).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile

_VERBOSE_VALUES = ("--verbose", "--verbose=true", "--verbose=1", "--verbose=yes")


def wants_verbose(argv: list[str]) -> bool:
    """Whether the command line or `TFMP_VERBOSE` asks for TensorFlow's native logging."""
    if os.environ.get("TFMP_VERBOSE", "").lower() in ("1", "true", "yes"):
        return True
    return any(arg.lower() in _VERBOSE_VALUES for arg in argv[1:])


def keras_backend() -> str:
    """The backend Keras will load: `KERAS_BACKEND`, else `~/.keras/keras.json`'s, else TF."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return str(json.load(f).get("backend", "tensorflow"))
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def quiet_tensorflow_startup(argv: list[str] | None = None) -> bool:
    """Imports TensorFlow and lists its GPUs with stderr's descriptor sent elsewhere.

    Does nothing unless the process is starting a program with `python -m` (not
    when a test imports a recipe), Keras' backend is TensorFlow (a JAX or PyTorch
    run never imports it), TensorFlow is installed and not yet imported, and
    `--verbose` is absent.

    Args:
        argv: The command line (default `sys.argv`; `"-m"` first while `python -m`
            looks for the module).

    Returns:
        Whether the start-up ran quietly.
    """
    argv = sys.argv if argv is None else argv
    if not argv or argv[0] != "-m" or wants_verbose(argv) or "tensorflow" in sys.modules:
        return False
    if keras_backend() != "tensorflow":
        return False
    if importlib.util.find_spec("tensorflow") is None:
        return False
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")  # cuInit's line, without a GPU
        except Exception:  # the program's own import reports it, in one line
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.buffer.write(captured.read())  # what TensorFlow said, shown
            sys.stderr.flush()
            return False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return True
