"""What tfmp's command-line programs share: one exit convention, argument and path checks.

Every recipe and tool ends with `tfmp.cli.run(main)` instead of `absl.app.run(main)`,
so that all of them exit the same way:

- 0: success.
- 2: a usage error, reported as one `error: ...` line on stderr, before the work
  starts (nothing was trained or written): an unknown flag or a value that does
  not parse, a bad argument, an output path that cannot be written, a bad
  `TF_CONFIG`, a `--model_dir` that holds a run of another model. These are
  `UsageError`s, the `ValueError`s and `FileNotFoundError`s raised inside
  `usage_errors()`, and `tfmp.backup.BackupError` (a corrupt backup, or a second
  run on the same `--model_dir`: the command cannot run as given; pass another
  `--model_dir`, or repair or remove the backup).
- 1: a failure during the work (any other exception), one `error: ...` line too.

No traceback is printed unless `--verbose` is passed, which also shows
TensorFlow's native start-up logging (hidden by `tools/startup.py` otherwise).

Flags are defined one way: `define_flags({name: (type, default, help)})`.

Example:

    def main(argv):
        tfmp.cli.check_no_arguments(argv)
        if _JSON.value:
            tfmp.cli.check_output_file(_JSON.value, argument="json")  # before the work
        with tfmp.cli.usage_errors():
            model = tfmp.cli.load_keras_file(_MODEL.value, argument="model")
        ...  # the work: an exception here exits with 1

    if __name__ == "__main__":
        tfmp.cli.run(main)
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import traceback as traceback_lib
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NoReturn

from absl import app, flags

if TYPE_CHECKING:
    import keras

USAGE_STATUS = 2
FAILURE_STATUS = 1
_MAX_MESSAGE = 2000
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Keras' bold layer-call messages


class UsageError(ValueError):
    """A bad command-line argument: reported as one `error:` line, exit status 2."""


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Turns the `ValueError`s and `FileNotFoundError`s of argument checks into `UsageError`s.

    Wrap the checks of a program's arguments (and the loading of its inputs) in
    it, not the work itself: a `ValueError` during training is a failure.
    """
    try:
        yield
    except UsageError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e


def _usage_error_types() -> tuple[type[BaseException], ...]:
    from tfmp import backup

    backup_error = getattr(backup, "BackupError", None)  # may not exist in every version
    return (UsageError,) + ((backup_error,) if isinstance(backup_error, type) else ())


def error_line(error: BaseException) -> str:
    """The one `error: ...` line that reports `error` (whitespace collapsed, no colours)."""
    message = " ".join(_ANSI.sub("", str(error)).split())
    if not isinstance(error, _usage_error_types()):
        name = type(error).__name__
        if not type(error).__module__.startswith("tfmp"):  # tfmp's own errors speak plainly
            message = f"{name}: {message}" if message else name
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE] + " [...]"
    return f"error: {message or type(error).__name__}"


def report(error: BaseException, *, traceback: bool = False) -> int:
    """Prints `error` as one `error:` line on stderr and returns the exit status (2 or 1).

    Args:
        error: The exception that ended the program.
        traceback: Print its traceback first.

    Returns:
        `USAGE_STATUS` (2) for a usage error, else `FAILURE_STATUS` (1).
    """
    if traceback:
        traceback_lib.print_exception(error, file=sys.stderr)
    print(error_line(error), file=sys.stderr, flush=True)
    return USAGE_STATUS if isinstance(error, _usage_error_types()) else FAILURE_STATUS


def call(main: Callable[[list[str]], int | None], argv: list[str], *,
         traceback: bool = False) -> int:
    """Calls `main(argv)` and returns its exit status, reporting any exception in one line.

    Args:
        main: The program's main function; returns None (success) or an exit status.
        argv: Its arguments (program name first, flags already parsed out).
        traceback: On an exception, print the traceback too.

    Returns:
        `main`'s status (None is 0), or that of `report` for an exception.
    """
    try:
        status = main(argv)
    except Exception as e:  # any failure becomes one line
        return report(e, traceback=traceback)
    return status or 0


def exit_on_import_error(error: ImportError, module_name: str) -> NoReturn:
    """For a program's module-level imports: one `error:` line and status 1 when run as a script.

    A program imported as a module (a test, another program) gets the error raised.

    Args:
        error: The ImportError (e.g. tfmp's one-line "needs TensorFlow" error).
        module_name: The calling module's `__name__`.

    Example:

        try:
            from tfmp import training  # TensorFlow only
        except ImportError as e:
            tfmp.cli.exit_on_import_error(e, __name__)
    """
    if module_name != "__main__":
        raise error
    sys.exit(report(error))


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Parses the command line into `flag_values`, raising `UsageError` for a bad flag.

    Args:
        argv: The command line, program name first.
        flag_values: The flags to parse into.

    Returns:
        The arguments left: the program name, then the positional arguments.

    Raises:
        UsageError: for an unknown flag or a flag value that does not parse (absl's
            message in one line).
    """
    try:
        return flag_values(list(argv))
    except flags.Error as e:
        raise UsageError(f"{' '.join(str(e).split())} (--helpfull lists the flags)") from None


def check_no_arguments(argv: Sequence[str]) -> None:
    """Raises `UsageError` if there are positional arguments after the program name."""
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments (flags are written --name=value): {argv[1:]}")


def _parse_or_exit(argv: list[str]) -> list[str]:
    try:
        return parse_flags(argv)
    except UsageError as e:
        sys.exit(report(e))


def run(main: Callable[[list[str]], int | None]) -> NoReturn:
    """`absl.app.run(main)` with tfmp's exit convention (see the module docstring).

    Adds a `--verbose` flag that prints the traceback of an error too (and, read
    by `tools/startup.py` before TensorFlow loads, its native start-up logging).

    Args:
        main: The program's main function, called with the arguments left after
            the flags; returns None (success) or an exit status.
    """
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, "Print an error's traceback and TensorFlow's "
                          "native start-up logging.")
    app.run(lambda argv: call(main, argv, traceback=flags.FLAGS.verbose),
            flags_parser=_parse_or_exit)
    raise AssertionError("absl.app.run returned")  # it always exits


_DEFINE = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           bool: flags.DEFINE_bool, list: flags.DEFINE_list}


def calling_module(depth: int = 1) -> str:
    """The name absl files flags under for the caller `depth` frames up (`sys.argv[0]` for
    `__main__`, as absl's own `DEFINE_*` do), so that `--help` lists a program's flags."""
    name = sys._getframe(depth + 1).f_globals.get("__name__", "")
    return sys.argv[0] if name == "__main__" else name


def define_flags(definitions: dict[str, tuple], module_name: str | None = None
                 ) -> dict[str, flags.FlagHolder]:
    """Defines a program's flags, the one way every recipe and tool does.

    Args:
        definitions: `{name: (kind, default, help)}`, where `kind` is `str`, `int`,
            `float`, `bool`, `list` (comma-separated strings) or a tuple of the
            allowed strings (an enum, matched in any case).
        module_name: The module the flags belong to (default: the caller's), which
            `--help` lists them under.

    Returns:
        Flag holders by name (`flag_values` reads them). A flag already defined (a
        second program imported into one process, as in tests) is reused, with
        its first default.

    Example:

        _FLAGS = define_flags({"steps": (int, 100, "Training steps.")})
        flag_values(_FLAGS)["steps"]
    """
    module_name = module_name or calling_module()
    holders = {}
    for name, (kind, default, help_text) in definitions.items():
        if name in flags.FLAGS:
            holders[name] = flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
        elif isinstance(kind, tuple):
            holders[name] = flags.DEFINE_enum(name, default, kind, help_text,
                                              case_sensitive=False, module_name=module_name)
        else:
            holders[name] = _DEFINE[kind](name, default, help_text, module_name=module_name)
    return holders


def flag_values(holders: dict[str, flags.FlagHolder]) -> dict:
    """The values of the flags `define_flags` returned, by name."""
    return {name: holder.value for name, holder in holders.items()}


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_can_write_in(directory: str, argument: str, received: str) -> None:
    """Refuses `received` unless `directory` (or its nearest existing ancestor) is writable."""
    existing = _nearest_existing(directory)
    if not os.path.isdir(existing):
        raise UsageError(f"`{argument}` cannot be created: {existing!r} is not a directory. "
                         f"Received: {argument}={received!r}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"`{argument}` cannot be written: {existing!r} is read-only or not "
                         f"writable by this user. Received: {argument}={received!r}")


def check_output_dir(path: str | os.PathLike, *, argument: str, replaced: bool = False) -> str:
    """Checks, before any work, that the output directory `path` can be created and written.

    Args:
        path: The directory.
        argument: The flag name to quote in errors.
        replaced: The directory is written beside itself and renamed into place
            (a SavedModel export), so its parent must be writable too.

    Returns:
        `path`, absolute.

    Raises:
        UsageError: when `path` is a file, or a file stands where one of its
            parents should be, or it (or the nearest parent that exists) is
            read-only or not writable by this user.
    """
    received = os.fspath(path)
    path = os.path.abspath(received)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"`{argument}` exists and is not a directory. "
                         f"Received: {argument}={received!r}")
    if os.path.isdir(path) and not replaced:
        _check_can_write_in(path, argument, received)
    else:
        _check_can_write_in(os.path.dirname(path), argument, received)
    return path


def check_output_file(path: str | os.PathLike, *, argument: str) -> str:
    """Checks, before any work, that the output file `path` can be written.

    Args:
        path: The file (its directory must exist).
        argument: The flag name to quote in errors.

    Returns:
        `path`, absolute.

    Raises:
        UsageError: when `path` is a directory, its directory does not exist, or
            it cannot be written.
    """
    received = os.fspath(path)
    path = os.path.abspath(received)
    if os.path.isdir(path):
        raise UsageError(f"`{argument}` is a directory; pass a file path. "
                         f"Received: {argument}={received!r}")
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise UsageError(f"`{argument}`'s directory {directory!r} does not exist or is not a "
                         f"directory. Received: {argument}={received!r}")
    writable = (os.access(path, os.W_OK) if os.path.exists(path)
                else os.access(directory, os.W_OK | os.X_OK))
    if not writable:
        raise UsageError(f"`{argument}` cannot be written (read-only or no permission). "
                         f"Received: {argument}={received!r}")
    return path


def check_keras_file(path: str, *, argument: str = "model") -> None:
    """Raises `ValueError` unless `path` is a file holding a `.keras` (zip) archive."""
    if not os.path.isfile(path):
        raise ValueError(f"`{argument}` is not a file. Received: {argument}={path!r}")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"`{argument}` is not a `.keras` zip archive. Received: {argument}={path!r}")


def load_keras_file(path: str, *, argument: str = "model",
                    compile: bool = False) -> keras.Model:
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
    import keras

    check_keras_file(path, argument=argument)
    try:
        with warnings.catch_warnings():  # "Skipping variable loading for optimizer ..."
            warnings.simplefilter("ignore", UserWarning)
            return keras.saving.load_model(path, safe_mode=True, compile=compile)
    except Exception as e:
        raise ValueError(
            f"could not load `{argument}` as a Keras model in safe mode "
            f"({type(e).__name__}: {e}). Received: {argument}={path!r}") from e
