"""tfmp: mixed precision training for TensorFlow/Keras 3."""

from tfmp import callbacks, data, distribute, export, layers, losses, models, training
from tfmp.export import export_saved_model, load_serving_layer
from tfmp.optimizers import LossScaleOptimizer
from tfmp.policies import POLICIES, policy_scope, resolve_policy, set_global_policy

__all__ = [
    "POLICIES",
    "LossScaleOptimizer",
    "callbacks",
    "data",
    "distribute",
    "export",
    "export_saved_model",
    "layers",
    "load_serving_layer",
    "losses",
    "models",
    "policy_scope",
    "resolve_policy",
    "set_global_policy",
    "training",
]
