"""tfmp: mixed precision training for TensorFlow/Keras 3."""

from tfmp import callbacks
from tfmp.optimizers import LossScaleOptimizer
from tfmp.policies import POLICIES, policy_scope, resolve_policy, set_global_policy

__all__ = [
    "POLICIES",
    "LossScaleOptimizer",
    "callbacks",
    "policy_scope",
    "resolve_policy",
    "set_global_policy",
]
