"""tfmp: mixed precision training for TensorFlow/Keras 3."""

from tfmp import (
    audit,
    callbacks,
    cli,
    convert,
    data,
    distribute,
    export,
    layers,
    losses,
    models,
    policies,
    training,
)
from tfmp.audit import AuditReport, audit_model
from tfmp.convert import DEFAULT_FLOAT32_LAYERS, apply_policy, summary
from tfmp.export import export_saved_model, load_serving_layer
from tfmp.optimizers import LossScaleOptimizer
from tfmp.policies import POLICIES, policy_scope, resolve_policy, set_global_policy

__all__ = [
    "AuditReport",
    "DEFAULT_FLOAT32_LAYERS",
    "POLICIES",
    "LossScaleOptimizer",
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
    "layers",
    "load_serving_layer",
    "losses",
    "models",
    "policies",
    "policy_scope",
    "resolve_policy",
    "set_global_policy",
    "summary",
    "training",
]
