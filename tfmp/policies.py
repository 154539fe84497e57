"""Global dtype policy helpers: named policies, an `"auto"` choice, and a scope.

The policy names are Keras' own (`keras.config.set_dtype_policy` takes them);
`"auto"` picks the fastest safe one for the machine this runs on.

Example:

    import tfmp
    name = tfmp.set_global_policy("auto")   # e.g. "mixed_float16" on a V100
    with tfmp.policy_scope("float32"):
        ...                                 # layers built here are float32
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import keras

logger = logging.getLogger("tfmp")

POLICIES = ("mixed_float16", "mixed_bfloat16", "float32")
POLICY_CHOICES = POLICIES + ("auto",)

# First NVIDIA generation with float16 tensor cores (Volta).
_MIN_TENSOR_CORE_CAPABILITY = (7, 0)
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def validate_policy_name(name: str, *, argument: str = "policy", allow_auto: bool = True) -> str:
    """Returns `name` if it is a known policy name, else raises `ValueError`.

    Args:
        name: The policy name to check.
        argument: The argument name to quote in the error message.
        allow_auto: Whether `"auto"` is accepted.

    Returns:
        `name`, unchanged.
    """
    allowed = POLICY_CHOICES if allow_auto else POLICIES
    if name not in allowed:
        raise ValueError(
            f"Unknown `{argument}`: {name!r}. Expected one of: {', '.join(allowed)}."
        )
    return name


def gpu_capabilities() -> list[tuple[int, int]]:
    """Compute capabilities of the NVIDIA GPUs visible to the current backend (none: [])."""
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            caps = []
            for gpu in tf.config.list_physical_devices("GPU"):
                cap = tf.config.experimental.get_device_details(gpu).get("compute_capability")
                if cap:
                    caps.append(tuple(cap))
            return caps
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                count = torch.cuda.device_count()
                return [torch.cuda.get_device_capability(i) for i in range(count)]
        if backend == "jax":
            import jax

            caps = []
            for dev in jax.devices():
                cap = getattr(dev, "compute_capability", None)
                if dev.platform == "gpu" and cap:
                    caps.append(tuple(int(p) for p in str(cap).split(".")[:2]))
            return caps
    except Exception as e:  # Detection must never break training start-up.
        logger.warning("tfmp: could not query GPUs (%s); assuming none.", e)
    return []


def _has_tpu() -> bool:
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_logical_devices("TPU"))
        if backend == "jax":
            import jax

            return any(d.platform == "tpu" for d in jax.devices())
    except Exception:
        return False
    return False


def _cpu_bf16_flags(cpuinfo_path: str = "/proc/cpuinfo") -> list[str]:
    """The native bfloat16 CPU flags (AVX512_BF16, AMX) this CPU reports."""
    if not os.path.exists(cpuinfo_path):
        return []
    with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [flag for flag in _CPU_BF16_FLAGS if flag in flags]
    return []


def auto_policy() -> tuple[str, str]:
    """Chooses a policy for this machine.

    Returns:
        `(policy_name, reason)`: `mixed_float16` on an NVIDIA GPU with compute
        capability 7.0 or newer, `mixed_bfloat16` on a TPU or a CPU with native
        bfloat16 (AVX512_BF16 or AMX), `float32` otherwise.
    """
    caps = gpu_capabilities()
    if caps:
        best = max(caps)
        if best >= _MIN_TENSOR_CORE_CAPABILITY:
            return "mixed_float16", f"NVIDIA GPU with compute capability {best[0]}.{best[1]}"
        return "float32", (
            f"NVIDIA GPU with compute capability {best[0]}.{best[1]} has no float16 "
            "tensor cores (needs 7.0+)"
        )
    if _has_tpu():
        return "mixed_bfloat16", "TPU found"
    flags = _cpu_bf16_flags()
    if flags:
        return "mixed_bfloat16", f"CPU with native bfloat16 ({', '.join(flags)})"
    return "float32", "no GPU, TPU or bfloat16-capable CPU found"


def resolve_policy(name: str) -> str:
    """Resolves a policy name (`"auto"` included) to a concrete Keras policy name.

    Args:
        name: One of `"mixed_float16"`, `"mixed_bfloat16"`, `"float32"`, `"auto"`.

    Returns:
        The concrete policy name.
    """
    validate_policy_name(name)
    if name != "auto":
        return name
    resolved, reason = auto_policy()
    logger.info("tfmp: policy 'auto' resolved to %s: %s.", resolved, reason)
    return resolved


def set_global_policy(name: str) -> str:
    """Sets Keras' global dtype policy.

    Args:
        name: One of `"mixed_float16"`, `"mixed_bfloat16"`, `"float32"`, `"auto"`.

    Returns:
        The name of the policy now in force (`"auto"` resolved).

    Example:

        >>> tfmp.set_global_policy("mixed_bfloat16")
        'mixed_bfloat16'
    """
    resolved = resolve_policy(name)
    keras.config.set_dtype_policy(resolved)
    return resolved


def global_policy_name() -> str:
    """The name of Keras' current global dtype policy."""
    return keras.config.dtype_policy().name


@contextlib.contextmanager
def policy_scope(name: str) -> Iterator[str]:
    """Sets the global policy inside a `with` block and restores it on exit.

    The previous policy comes back also when the block raises.

    Args:
        name: A policy name, as for `set_global_policy`.

    Yields:
        The resolved policy name.

    Example:

        with tfmp.policy_scope("mixed_float16"):
            layer = keras.layers.Dense(8)   # computes in float16
    """
    previous = keras.config.dtype_policy()
    resolved = set_global_policy(name)
    try:
        yield resolved
    finally:
        keras.config.set_dtype_policy(previous)
