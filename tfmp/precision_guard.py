"""Automatic float32 fallback during training: `PrecisionGuard` (`keras.ops` only).

Loss scaling fixes gradients that underflow or overflow; it cannot fix a forward
pass whose float16 activations pass 65504. Such a run skips every step (the
loss is inf or NaN) while the scale falls to its minimum. `PrecisionGuard` notices
that, probes a batch with `tfmp.audit_model` (the model's own per-layer
policies against a float32 copy with the same weights), switches exactly the
layers the audit recommends to `"float32"`, in place (no weight is touched: the
variables are float32 under a mixed policy already), rebuilds the train step and
carries on from the same step, with the loss scale back at its initial value.

It never hides a real divergence: when the float32 copy is not finite either, or
the audit finds nothing to switch, it raises `tfmp.callbacks.LossScaleError`
naming the first layer whose float32 output is not finite.

Every switch is recorded: `guard.switches` (step, layers, reason, probe time),
one warning on the `tfmp` logger, `float32_layers` (how many layers the guard
moved) in the epoch logs (so in `History` and TensorBoard), and the layers'
own `dtype_policy`, which `model.save` keeps: a reloaded or resumed model computes
those layers in float32 too.

Example:

    model.compile(optimizer=tfmp.LossScaleOptimizer(keras.optimizers.Adam()), loss="mse")
    guard = tfmp.precision_guard.PrecisionGuard(probe_data=(x[:32], y[:32]))
    model.fit(x, y, callbacks=[guard])
    guard.switches          # [{"step": 412, "layers": ["attention_3"], ...}]
"""

from __future__ import annotations

import logging
import time
from typing import Any

import keras
import numpy as np
from keras import ops

from tfmp import _checks
from tfmp.callbacks import LossScaleError


def _first_batch(probe_data):
    """`(x, y)` from a batch tuple, an `x` alone, or the first element of a dataset."""
    if hasattr(probe_data, "take") and hasattr(probe_data, "element_spec"):  # tf.data
        probe_data = next(iter(probe_data.take(1)))
    if isinstance(probe_data, tuple) and len(probe_data) in (2, 3):
        return probe_data[0], probe_data[1]
    return probe_data, None


def _layer_at(model: keras.Model, name: str) -> keras.layers.Layer:
    """The layer the audit names `outer/inner` (nested models), from `model`."""
    layer = model
    for part in name.split("/"):
        layer = layer.get_layer(part)
    return layer


def first_nonfinite_float32_layer(model: keras.Model, x) -> keras.layers.Layer | None:
    """The first top-level layer whose output is not finite when the model runs in float32.

    Args:
        model: A built Sequential or Functional model.
        x: One batch of inputs.

    Returns:
        That layer of a float32 copy (same weights, same names), or None when the
        float32 outputs are all finite.
    """
    from tfmp.convert import apply_policy

    float32 = apply_policy(model, "float32")
    layers = [layer for layer in float32.layers if not isinstance(layer, keras.layers.InputLayer)]
    probe = keras.Model(float32.inputs, [layer.output for layer in layers])
    outputs = probe(x, training=False)
    for layer, output in zip(layers, outputs if len(layers) > 1 else [outputs], strict=True):
        for value in keras.tree.flatten(output):
            if not np.all(np.isfinite(ops.convert_to_numpy(ops.cast(value, "float32")))):
                return layer
    return None


def layers_to_float32(model: keras.Model, x) -> tuple[list[str], str]:
    """The layers whose float16 (or bfloat16) computation fails on batch `x`.

    Args:
        model: A built Sequential or Functional model, under its own policies.
        x: One batch of inputs.

    Returns:
        `(names, reason)`: the audit's recommended layers (`outer/inner` inside
        nested models) and why, in one line.

    Raises:
        LossScaleError: when the float32 copy is not finite either (naming the
            first such layer), or nothing computes in a 16-bit dtype to switch.
    """
    from tfmp.audit import audit_model  # the audit's graph walk, loaded on first use

    diverging = first_nonfinite_float32_layer(model, x)
    if diverging is not None:
        raise LossScaleError(
            f"layer {diverging.name!r} ({type(diverging).__name__}) produces inf/NaN in float32 "
            "too: the model itself diverges, float32 cannot fix it (lower the learning rate, "
            "check the data)")
    report = audit_model(model, x, policy=None)
    rows = [row for row in report.layers if row.recommend_float32 and not row.type.startswith(
        "op:")]
    if not rows:
        raise LossScaleError(
            "training skips every step, but no layer overflows in its 16-bit dtype on the probe "
            "batch: float32 placement cannot fix it (check the data and the learning rate)")
    reason = "; ".join(f"{row.name}: {row.reason}" for row in rows)
    return [row.name for row in rows], reason


@keras.saving.register_keras_serializable(package="tfmp")
class PrecisionGuard(keras.callbacks.Callback):
    """Moves the layers that overflow in float16 to float32, in place, during `fit`.

    Algorithm, every `patience` steps (one read of the optimizer's counters):

        if consecutive_skipped_steps >= patience and (loss_scale <= low_scale
                                                       or a skipped loss was inf/NaN):
            names = audit(probe batch).recommended float32 layers   # or LossScaleError
            for name in names: model.get_layer(name).dtype_policy = "float32"
            rebuild the train step; loss_scale = initial; consecutive skips = 0

    Needs `tfmp.LossScaleOptimizer` (its skip counters). At most
    `max_switches` switches per `fit`; trouble after that is left to
    `LossScaleMonitor`'s stop.

    Args:
        probe_data: The batch the audit probes: `(x, y)`, `x`, or a dataset
            (its first batch). None only for a guard rebuilt from its config,
            which then raises `LossScaleError` when it would act.
        patience: Skipped steps in a row (>= 1) before acting, and the steps
            between reads of the counters.
        low_scale: The scale (> 0) at or below which skipping counts as trouble
            that scaling cannot fix (also when the loss itself was inf/NaN).
        max_switches: Switches (>= 1) per `fit`.

    Raises:
        ValueError: for a bad argument.
    """

    def __init__(self, probe_data=None, *, patience: int = 10, low_scale: float = 1.0,
                 max_switches: int = 3):
        super().__init__()
        self.probe_data = probe_data
        self.patience = _checks.integer("patience", patience)
        self.low_scale = _checks.number("low_scale", low_scale)
        _checks.check(self.low_scale > 0, "low_scale", low_scale, "a positive number")
        self.max_switches = _checks.integer("max_switches", max_switches)
        self.switches: list[dict[str, Any]] = []
        self._nonfinite_loss_at_check = 0

    def get_config(self) -> dict:
        return {"patience": self.patience, "low_scale": self.low_scale,
                "max_switches": self.max_switches}

    @classmethod
    def from_config(cls, config: dict) -> PrecisionGuard:
        return cls(**config)

    @property
    def float32_layers(self) -> list[str]:
        """Every layer this guard moved to float32, in order."""
        return [name for switch in self.switches for name in switch["layers"]]

    def _guarded_optimizer(self):
        """The model's tfmp optimizer, or None. On JAX, `self.model` first syncs fit's state
        back into the variables (and the next step reads them again)."""
        opt = self.model.optimizer
        return opt if hasattr(opt, "consecutive_skipped_steps") and opt.built else None

    def on_train_begin(self, logs=None):
        self._fit_switches = 0
        self._nonfinite_loss_at_check = 0
        self._active = hasattr(self.model.optimizer, "consecutive_skipped_steps")

    def on_train_batch_end(self, batch, logs=None):
        if not self._active or (batch + 1) % self.patience:
            return
        opt = self._guarded_optimizer()
        if opt is None:
            return
        self._check(opt)

    def _check(self, opt) -> None:
        stats = opt.stats()  # the counters as Python numbers
        nonfinite = stats["nonfinite_loss_steps"]
        bad_loss, self._nonfinite_loss_at_check = (nonfinite > self._nonfinite_loss_at_check,
                                                   nonfinite)
        if (stats["consecutive_skipped_steps"] < self.patience
                or self._fit_switches >= self.max_switches):
            return
        if not (bad_loss or stats["loss_scale"] <= self.low_scale):
            return
        self._switch(opt, step=stats["iterations"] + stats["skipped_steps"])

    def _switch(self, opt, step: int) -> None:
        if self.probe_data is None:
            raise LossScaleError("PrecisionGuard would probe the model, but it has no "
                                 "`probe_data` (a guard rebuilt from its config has none)")
        x, _ = _first_batch(self.probe_data)
        start = time.perf_counter()
        names, reason = layers_to_float32(self.model, x)
        probe_seconds = time.perf_counter() - start
        for name in names:
            _layer_at(self.model, name).dtype_policy = "float32"
        self._rebuild_train_step()
        opt.loss_scale.assign(float(opt.initial_scale))
        opt.consecutive_skipped_steps.assign(0)
        self._fit_switches += 1
        self.switches.append({"step": step, "layers": names, "reason": reason,
                              "probe_seconds": probe_seconds})
        logging.getLogger("tfmp").warning(
            "PrecisionGuard: step %d: %d skipped steps in a row; switched %s to float32 "
            "(%s); probe took %.2f s", step, self.patience, ", ".join(names), reason,
            probe_seconds)

    def _rebuild_train_step(self) -> None:
        """Drops the traced train step, so the next step traces one with the new policies."""
        model = self.model
        if keras.backend.backend() == "jax":  # jax.jit would reuse the trace of the old policies
            import jax

            jax.clear_caches()
        model.train_function = None
        model.make_train_function(force=True)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["float32_layers"] = float(len(self.float32_layers))
