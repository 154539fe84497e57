"""Gradients of a scalar function on every Keras backend (TensorFlow, JAX, PyTorch).

Keras 3 has no backend-agnostic `grad`; this is the one place tfmp asks the
backend for one: `tf.GradientTape`, `jax.grad` or `torch.autograd.grad`.

Example:

    weight_grads, other_grads = gradients(lambda a, b: ops.sum(a[0] * b[0]), [w], [x])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras


def gradients(fn: Callable, first: Sequence, second: Sequence) -> tuple[list, list]:
    """The gradients of the scalar `fn(first, second)` with respect to both lists.

    Args:
        fn: takes two lists of tensors, returns a scalar tensor. It must not
            assign variables (run them in a `keras.StatelessScope`): JAX traces it.
        first: tensors (e.g. variable values).
        second: tensors.

    Returns:
        `(first_grads, second_grads)`: lists of tensors in the backend's type,
        `None` (TensorFlow, PyTorch) or zeros (JAX) where `fn` does not depend on
        the tensor.

    Raises:
        NotImplementedError: on a backend other than tensorflow, jax and torch.
    """
    first, second = list(first), list(second)
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        first_grads, second_grads = jax.grad(fn, argnums=(0, 1))(first, second)
        return list(first_grads), list(second_grads)
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch([first, second])
            value = fn(first, second)
        grads = tape.gradient(value, first + second)
        return list(grads[:len(first)]), list(grads[len(first):])
    if backend == "torch":
        import torch

        leaves = [t.detach().requires_grad_(True) for t in first + second]
        value = fn(leaves[:len(first)], leaves[len(first):])
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
        return list(grads[:len(first)]), list(grads[len(first):])
    raise NotImplementedError(f"No gradients on the Keras backend {backend!r}.")
