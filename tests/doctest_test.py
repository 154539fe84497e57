"""The `>>>` examples in tfmp's and the tools' docstrings run, and print what they show."""

import doctest
import glob
import importlib
import os

import keras
import numpy as np
from absl.testing import parameterized
from keras import ops

import tfmp
from tests.base import BACKEND, REPO, TestCase

_TENSORFLOW_ONLY = {"tfmp.data", "tfmp.distribute", "tfmp.export", "tfmp.training"}


def _modules_with_examples() -> list[str]:
    """Every module of tfmp/ and tools/ whose source holds a `>>>` example."""
    names = []
    for path in sorted(glob.glob(os.path.join(REPO, "tfmp", "*.py")) +
                       glob.glob(os.path.join(REPO, "tools", "*.py"))):
        with open(path) as f:
            if ">>> " in f.read():
                names.append(os.path.relpath(path, REPO)[:-3].replace(os.sep, "."))
    return names


class DocstringExamplesTest(TestCase):

    def test_examples_are_found(self):
        self.assertIn("tfmp.losses", _modules_with_examples())

    @parameterized.named_parameters(*[(name.replace(".", "_"), name)
                                      for name in _modules_with_examples()])
    def test_examples_run(self, name):
        if name in _TENSORFLOW_ONLY and BACKEND != "tensorflow":
            self.skipTest(f"{name} is TensorFlow only")
        module = importlib.import_module(name)
        result = doctest.testmod(module, extraglobs={"keras": keras, "np": np, "ops": ops,
                                                     "tfmp": tfmp},
                                 optionflags=doctest.ELLIPSIS, report=False)
        self.assertGreater(result.attempted, 0, name)
        self.assertEqual(result.failed, 0, f"{result.failed} example(s) of {name} failed "
                                           "(run doctest on it to see which)")
