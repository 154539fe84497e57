"""Prints the dtype policy of every layer of a saved `.keras` model.

python -m tools.inspect_policy model.keras [--json]

One row a layer: name, type, policy, compute/variable/output dtype, and the
Dense/Conv/Embedding/attention dimensions that are not multiples of 8 (see
`tfmp.convert.summary`). With `--json`, prints the rows as a JSON list instead
of the table. The model is loaded with `safe_mode=True` and `compile=False` (no
Lambda code, no pickles, no optimizer). A bad flag or argument, or a missing or
unreadable file, prints one `error:` line on stderr and exits with status 2
(`tfmp.cli.run`; TensorFlow's own C++ start-up lines may also reach stderr).
"""

import json
from collections.abc import Callable
from typing import Any

import tfmp

# Defined only when the tool runs as a program (`__main__` below), not on import: tests
# import this module, and tools.bench_optimizer and tools.benchmark define a string --json.
_FLAG_TABLE = {
    "json": (bool, False, "Print the rows as JSON instead of a table."),
}


def inspect_policy(
    path: str, *, as_json: bool = False, print_fn: Callable[[str], Any] = print
) -> list[dict[str, Any]]:
    """Loads the model at `path` safely and prints its per-layer dtype report.

    Args:
        path: Path of a `.keras` model file.
        as_json: Print the rows as one JSON document instead of a table.
        print_fn: Called with the output (each table line, or the JSON text).

    Returns:
        The rows, as returned by `tfmp.convert.summary`.

    Raises:
        ValueError: if `path` is not a readable `.keras` archive, or Keras
            cannot load it in safe mode.

    Example:

        rows = inspect_policy("model.keras", as_json=True)
    """
    model = tfmp.cli.load_keras_file(path, argument="path")
    if not as_json:
        return tfmp.convert.summary(model, print_fn=print_fn)
    rows = tfmp.convert.summary(model, print_fn=lambda line: None)
    print_fn(json.dumps(rows, indent=2))
    return rows


def main(argv):
    if len(argv) != 2:
        raise tfmp.cli.UsageError(
            "expected exactly one model path: python -m tools.inspect_policy "
            f"model.keras [--json]. Received: {argv[1:]}")
    with tfmp.cli.usage_errors():  # every error here is about the file given
        inspect_policy(argv[1], as_json=_FLAGS["json"].value)


if __name__ == "__main__":
    _FLAGS = tfmp.cli.define_flags(_FLAG_TABLE)  # as a program only: see _FLAG_TABLE
    tfmp.cli.run(main)
