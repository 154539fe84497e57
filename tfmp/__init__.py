"""tfmp: mixed precision training for Keras 3 (TensorFlow, JAX and PyTorch backends).

The core (`policies`, `LossScaleOptimizer`, `optimizer_config`, `layers`,
`normalization`, `losses`, `convert`, `audit`, `callbacks`) runs on every Keras backend and is
imported here. The TensorFlow-only modules (`data`, `distribute`, `export`,
`training`) and their functions load on first use; without TensorFlow they
raise a one-line ImportError that says what to install.
"""

import importlib

from tfmp import (
    _tf,
    audit,
    callbacks,
    cli,
    convert,
    layers,
    losses,
    models,
    normalization,
    optimizer_config,
    policies,
)
from tfmp.audit import AuditReport, audit_model
from tfmp.convert import DEFAULT_FLOAT32_LAYERS, apply_policy, summary
from tfmp.optimizers import LossScaleOptimizer
from tfmp.policies import POLICIES, policy_scope, resolve_policy, set_global_policy
from tfmp.precision_guard import PrecisionGuard

# TensorFlow only: name -> (module, attribute or None for the module itself).
_LAZY = {
    "data": ("tfmp.data", None),
    "distribute": ("tfmp.distribute", None),
    "export": ("tfmp.export", None),
    "training": ("tfmp.training", None),
    "tflite": ("tfmp.tflite", None),
    "export_tflite": ("tfmp.tflite", "export_tflite"),
    "export_saved_model": ("tfmp.export", "export_saved_model"),
    "load_serving_layer": ("tfmp.export", "load_serving_layer"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'tfmp' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = [
    "AuditReport",
    "DEFAULT_FLOAT32_LAYERS",
    "POLICIES",
    "LossScaleOptimizer",
    "PrecisionGuard",
    "apply_policy",
    "audit",
    "audit_model",
    "callbacks",
    "cli",
    "convert",
    "data",
    "distribute",
    "export",
    "export_saved_model",
    "export_tflite",
    "layers",
    "load_serving_layer",
    "losses",
    "models",
    "normalization",
    "optimizer_config",
    "policies",
    "policy_scope",
    "precision_guard",
    "resolve_policy",
    "set_global_policy",
    "summary",
    "tflite",
    "training",
]
if not _tf.available():  # `from tfmp import *` then leaves out what needs TensorFlow.
    __all__ = [name for name in __all__ if name not in _LAZY]
