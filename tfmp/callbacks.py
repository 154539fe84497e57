"""Keras callbacks that show what loss scaling does during `fit` (and re-export the backups).

The TensorBoard writer uses `tf.summary` (TensorFlow only, imported when
`log_dir` is given); the rest works on every backend.
"""

from __future__ import annotations

import logging
import time

import keras
import numpy as np
from keras import ops

from tfmp.backup import BackupAndRestore, BackupError

__all__ = ["BackupAndRestore", "BackupError", "LossScaleError", "LossScaleMonitor", "Throughput"]


class LossScaleError(RuntimeError):
    """Raised when loss scaling cannot rescue training any more."""


def _nonfinite_loss_steps(opt) -> int:
    if opt is None or not hasattr(opt, "nonfinite_loss_steps"):
        return 0
    return int(ops.convert_to_numpy(opt.nonfinite_loss_steps))


def _loss_scale_optimizer(model):
    opt = getattr(model, "optimizer", None)
    return opt if isinstance(opt, keras.optimizers.LossScaleOptimizer) else None


@keras.saving.register_keras_serializable(package="tfmp")
class LossScaleMonitor(keras.callbacks.Callback):
    """Logs the loss scale and skipped steps, and stops hopeless runs.

    Adds `loss_scale` and `skipped_steps` to the logs that `fit` prints and
    returns in `History`, writes them as TensorBoard scalars (one point per
    optimizer step, applied or skipped) when `log_dir` is given, and raises
    `LossScaleError` once `max_consecutive_skips` steps in a row were skipped
    with the scale at its minimum (or fixed): loss scaling cannot fix that, the
    model itself produces inf/NaN. The error names the variables whose
    gradients were non-finite on the last step.

    With `tfmp.LossScaleOptimizer` it also guards the model's non-trainable
    state (batch-normalisation statistics and any state a layer updates in its
    forward pass: see `LossScaleOptimizer.guard_state`), so a skipped step
    leaves every variable of the model as it was, and it tells skipped steps
    whose *loss* was non-finite (inf/NaN in the data or in the forward pass;
    loss scaling does not cause these) from overflows of the scaled gradients:
    `nonfinite_loss_steps` in the epoch logs, and one warning per epoch.

    Works with `tfmp.LossScaleOptimizer`; with Keras' own class it logs the
    scale only. Does nothing when the model's optimizer scales no loss.

    Args:
        log_dir: Directory for TensorBoard event files, or None.
        max_consecutive_skips: Skipped steps in a row (>= 1) at the minimum
            scale after which training stops; None never stops.
        guard_state: Whether to guard the model's non-trainable variables.

    Example:

        model.compile(optimizer=tfmp.LossScaleOptimizer(keras.optimizers.Adam()), loss="mse")
        history = model.fit(x, y, callbacks=[tfmp.callbacks.LossScaleMonitor("logs")])
        history.history["loss_scale"]
    """

    def __init__(self, log_dir: str | None = None, max_consecutive_skips: int | None = 100,
                 guard_state: bool = True):
        super().__init__()
        if max_consecutive_skips is not None and (
            not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1
        ):
            raise ValueError(
                "`max_consecutive_skips` must be an integer >= 1 or None. "
                f"Received: max_consecutive_skips={max_consecutive_skips!r}"
            )
        self.log_dir = log_dir
        self.max_consecutive_skips = max_consecutive_skips
        self.guard_state = bool(guard_state)
        self._writer = None
        self._sync_before_first_step = False
        self._nonfinite_loss_at_epoch_start = 0

    @classmethod
    def from_config(cls, config: dict) -> LossScaleMonitor:
        return cls(**config)

    def get_config(self) -> dict:
        return {"log_dir": self.log_dir, "max_consecutive_skips": self.max_consecutive_skips,
                "guard_state": self.guard_state}

    def _values(self, opt) -> dict:
        scale = getattr(opt, "loss_scale", opt.dynamic_scale)  # tfmp's is 1.0 when disabled
        logs = {"loss_scale": float(ops.convert_to_numpy(scale))}
        if hasattr(opt, "skipped_steps"):
            logs["skipped_steps"] = int(ops.convert_to_numpy(opt.skipped_steps))
        return logs

    def on_train_begin(self, logs=None):
        opt = _loss_scale_optimizer(self.model)
        if self.log_dir and opt is not None:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(self.log_dir)
        if self.guard_state and hasattr(opt, "guard_state"):
            if opt.guard_state(self.model) and getattr(self.model, "train_function", None):
                self.model.make_train_function(force=True)  # traced without the guard
            # Restores (BackupAndRestore) may still load weights in on_train_begin.
            self._sync_before_first_step = True

    def on_train_batch_begin(self, batch, logs=None):
        if self._sync_before_first_step:
            self._sync_before_first_step = False
            _loss_scale_optimizer(self.model).sync_guarded_state()

    def on_epoch_begin(self, epoch, logs=None):
        opt = _loss_scale_optimizer(self.model)
        self._nonfinite_loss_at_epoch_start = _nonfinite_loss_steps(opt)

    def on_train_batch_end(self, batch, logs=None):
        opt = _loss_scale_optimizer(self.model)
        if opt is None or not opt.built:
            return
        values = self._values(opt)
        if logs is not None:
            logs.update(values)
        if self._writer is not None:
            self._write(opt, values)
        self._check_hopeless(opt, values)

    def on_epoch_end(self, epoch, logs=None):
        opt = _loss_scale_optimizer(self.model)
        if opt is None or not opt.built:
            return
        values = self._values(opt)
        if hasattr(opt, "nonfinite_loss_steps"):
            values["nonfinite_loss_steps"] = _nonfinite_loss_steps(opt)
            new = values["nonfinite_loss_steps"] - self._nonfinite_loss_at_epoch_start
            if new > 0:
                logging.getLogger("tfmp").warning(
                    "epoch %d: %d skipped step(s) had a non-finite loss: inf/NaN in the data "
                    "or in the forward pass, not a loss-scale overflow (check the data, e.g. "
                    "with python -m tools.audit)", epoch + 1, new)
        if logs is not None:
            logs.update(values)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write(self, opt, values):
        import tensorflow as tf

        step = int(ops.convert_to_numpy(opt.iterations)) + values.get("skipped_steps", 0)
        with self._writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def _check_hopeless(self, opt, values):
        if self.max_consecutive_skips is None or not hasattr(opt, "consecutive_skipped_steps"):
            return
        consecutive = int(ops.convert_to_numpy(opt.consecutive_skipped_steps))
        # The scale is a float32 variable: compare with min_scale rounded the same way.
        at_floor = (not opt.dynamic or not getattr(opt, "enabled", True)
                    or values["loss_scale"] <= float(np.float32(opt.min_scale)))
        if consecutive < self.max_consecutive_skips or not at_floor:
            return
        names = opt.nonfinite_variables()
        self.model.stop_training = True
        loss_steps = _nonfinite_loss_steps(opt)
        loss_note = (f" {loss_steps} skipped step(s) so far had a non-finite loss itself "
                     "(inf/NaN in the data or the forward pass)." if loss_steps else "")
        raise LossScaleError(
            f"{consecutive} training steps in a row were skipped for non-finite gradients "
            f"with the loss scale at its minimum ({values['loss_scale']:g}). Loss scaling "
            "cannot fix this: the model computes inf/NaN itself (NaN or inf in the data, a "
            "layer that overflows float16, or a learning rate that is too high)."
            f"{loss_note} "
            f"Variables with non-finite gradients on the last step: "
            f"{', '.join(names) or 'none recorded'}."
        )


@keras.saving.register_keras_serializable(package="tfmp")
class Throughput(keras.callbacks.Callback):
    """Adds `examples_per_second` (training, per epoch) to the epoch logs.

    Args:
        batch_size: Global examples per step.

    Example:

        model.fit(ds, callbacks=[tfmp.callbacks.Throughput(batch_size=256)])
    """

    def __init__(self, batch_size: int):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"`batch_size` must be an integer >= 1. Received: batch_size={batch_size!r}")
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, config: dict) -> Throughput:
        return cls(**config)

    def get_config(self) -> dict:
        return {"batch_size": self.batch_size}

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps = batch + 1  # batch is the last step index (steps_per_execution aware)

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.perf_counter() - self._start
        if logs is not None and elapsed > 0:
            logs["examples_per_second"] = self._steps * self.batch_size / elapsed
