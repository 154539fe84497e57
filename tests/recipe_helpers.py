"""Helpers for the recipe tests: run a recipe module as a user would."""

import json
import re
import subprocess
import sys

from tests import base

REPO = base.REPO
ENV = base.ENV


def command(module: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", module, *flags]


def run_cli(module: str, *flags: str, timeout: int = 300,
            without_tensorflow: bool = False) -> subprocess.CompletedProcess:
    return base.run_python(["-m", module, *flags], timeout=timeout,
                           without_tensorflow=without_tensorflow)


def results_of(stdout: str) -> dict:
    """The `results: {...}` line a recipe prints last."""
    lines = [line for line in stdout.splitlines() if line.startswith("results: ")]
    if not lines:
        raise AssertionError(f"no results line in:\n{stdout}")
    return json.loads(lines[-1][len("results: "):])


# TensorFlow 2.16's C++ start-up lines: "2024-05-01 12:00:00.123456: E external/...".
_DATED_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] ")


def error_lines(stderr: str) -> list[str]:
    """stderr without TensorFlow's start-up log lines."""
    noise = ("I0000", "W0000", "E0000", "WARNING: All log messages", "I1", "W1", "E1",
             "To enable the following instructions")
    return [line for line in stderr.splitlines()
            if line and not line.startswith(noise) and not _DATED_LOG.match(line)]


def run_recipe(recipe, **settings) -> dict:
    """`recipe.run(recipe.config(<run settings>), **<the rest>)`, as `main` calls it.

    The settings named in `tfmp.run_config.FLAGS` make the `RunConfig` (a bad one
    raises `UsageError`, as on the command line); the others are `run`'s own
    arguments (the model's, `dataset_override`, `verbose`).
    """
    from tfmp import cli, run_config

    names = set(run_config.FLAGS)
    with cli.usage_errors():
        config = recipe.config(**{k: v for k, v in settings.items() if k in names})
    return recipe.run(config, **{k: v for k, v in settings.items() if k not in names})
