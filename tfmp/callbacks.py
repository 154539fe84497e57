"""Keras callbacks that show what loss scaling does during `fit` (and re-export the backups).

Every backend: nothing here imports TensorFlow at module level. Only the
TensorBoard writer of `LossScaleMonitor(log_dir=...)` uses `tf.summary`, with
any Keras backend where TensorFlow is installed; without it, constructing the
monitor with a `log_dir` raises a one-line `ImportError`.
"""

from __future__ import annotations

import logging
import time

import keras
import numpy as np
from keras import ops

from tfmp import _checks, _tf
from tfmp.backup import BackupAndRestore, BackupError

__all__ = ["BackupAndRestore", "BackupError", "LossScaleError", "LossScaleMonitor", "Throughput"]

_WRITER_FEATURE = "LossScaleMonitor(log_dir=...)"


class LossScaleError(RuntimeError):
    """Raised when loss scaling cannot rescue training any more."""


def _read_int(variable) -> int:
    return int(ops.convert_to_numpy(variable))


def _nonfinite_loss_steps(opt) -> int:
    if opt is None or not hasattr(opt, "nonfinite_loss_steps"):
        return 0
    return _read_int(opt.nonfinite_loss_steps)


def _loss_scale_optimizer(model):
    opt = getattr(model, "optimizer", None)
    return opt if isinstance(opt, keras.optimizers.LossScaleOptimizer) else None


@keras.saving.register_keras_serializable(package="tfmp")
class LossScaleMonitor(keras.callbacks.Callback):
    """Logs the loss scale and skipped steps, and stops hopeless runs.

    Adds `loss_scale` and `skipped_steps` to the logs that `fit` prints and
    returns in `History`, writes them as TensorBoard scalars (one point per
    read, at the optimizer step, applied or skipped) when `log_dir` is given,
    and raises `LossScaleError` once `max_consecutive_skips` steps in a row
    were skipped with the scale at its minimum (or fixed): loss scaling cannot
    fix that, the model itself produces inf/NaN. The error names the variables
    whose gradients were non-finite on the last step.

    Reading the counters copies them from the device: a host-device
    synchronisation that stalls an accelerator's pipeline. The monitor reads
    them at each epoch end and, during an epoch, only on the steps that
    `check_every` names (at the end of an execution with
    `steps_per_execution > 1`); per-batch logs and TensorBoard points exist
    only for those steps. The counters, consecutive skips included, are kept
    on the device, so a read every few steps suffices for the stop decision.

    - `check_every=None` (the default): during an epoch, a read after the
      first step of `fit`, then only where the stop could first be due:
      `max_consecutive_skips` steps after a read that saw no skipped step,
      `max_consecutive_skips - k` steps after one that saw `k` in a row. A
      hopeless run stops after the same step as with a read per step, a
      healthy run is read once per `max_consecutive_skips` steps, and none is
      read during an epoch when `max_consecutive_skips` is None.
    - `check_every=N`: a read every `N` steps (`1`: every step); a hopeless
      run (every step skipped at the minimum scale) stops within
      `max_consecutive_skips + N - 1` steps (or at the end of that step's
      execution).

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
        log_dir: Directory for TensorBoard event files (needs TensorFlow
            installed, with any Keras backend), or None.
        max_consecutive_skips: Skipped steps in a row (>= 1) at the minimum
            scale after which training stops; None never stops.
        guard_state: Whether to guard the model's non-trainable variables.
        check_every: Steps (>= 1) between reads during an epoch, or None to
            read only at epoch ends and where `max_consecutive_skips` could be
            reached (never during an epoch when that is None too).

    Raises:
        ValueError: for a `max_consecutive_skips` or `check_every` that is
            neither None nor an integer >= 1.
        ImportError: for a `log_dir` where TensorFlow is not installed.

    Example:

        model.compile(optimizer=tfmp.LossScaleOptimizer(keras.optimizers.Adam()), loss="mse")
        history = model.fit(x, y, callbacks=[tfmp.callbacks.LossScaleMonitor("logs")])
        history.history["loss_scale"]
    """

    def __init__(self, log_dir: str | None = None, max_consecutive_skips: int | None = 100,
                 guard_state: bool = True, check_every: int | None = None):
        super().__init__()
        self.max_consecutive_skips = _checks.integer(
            "max_consecutive_skips", max_consecutive_skips, allow_none=True)
        self.check_every = _checks.integer("check_every", check_every, allow_none=True)
        if log_dir:
            _tf.import_tensorflow(_WRITER_FEATURE)  # now, not in the middle of training
        self.log_dir = log_dir
        self.guard_state = bool(guard_state)
        self._writer = None
        self._last_written_step = None
        self._optimizer = None
        self._sync_before_first_step = False
        self._nonfinite_loss_at_epoch_start = 0
        self._last_batch = -1
        self._unread_steps = 0
        self._steps_to_next_read = None

    @classmethod
    def from_config(cls, config: dict) -> LossScaleMonitor:
        return cls(**config)

    def get_config(self) -> dict:
        return {"log_dir": self.log_dir, "max_consecutive_skips": self.max_consecutive_skips,
                "guard_state": self.guard_state, "check_every": self.check_every}

    # -------------------------------------------------------------- hooks
    def on_train_begin(self, logs=None):
        opt = self._optimizer = _loss_scale_optimizer(self.model)
        if self.log_dir and opt is not None:
            tf = _tf.import_tensorflow(_WRITER_FEATURE)
            self._writer = tf.summary.create_file_writer(self.log_dir)
            self._last_written_step = None
        if self.guard_state and hasattr(opt, "guard_state"):
            if opt.guard_state(self.model) and getattr(self.model, "train_function", None):
                self.model.make_train_function(force=True)  # traced without the guard
            # Restores (BackupAndRestore) may still load weights in on_train_begin.
            self._sync_before_first_step = True
        self._unread_steps = 0
        self._steps_to_next_read = self._first_read_after()

    def on_train_batch_begin(self, batch, logs=None):
        if self._sync_before_first_step:
            self._sync_before_first_step = False
            _loss_scale_optimizer(self.model).sync_guarded_state()

    def on_epoch_begin(self, epoch, logs=None):
        self._last_batch = -1
        if self._optimizer is not None:  # once per epoch: `model` syncs the state on JAX
            self._nonfinite_loss_at_epoch_start = _nonfinite_loss_steps(
                _loss_scale_optimizer(self.model))

    def on_train_batch_end(self, batch, logs=None):
        # No device read and no `self.model` (on JAX a state sync) unless a read is due.
        if self._optimizer is None or not self._count_steps(batch):
            return
        values = self._read()
        if values is None:
            return
        if logs is not None:
            logs.update(values)
        self._after_read(values)

    def on_epoch_end(self, epoch, logs=None):
        values = self._read() if self._optimizer is not None else None
        if values is None:
            return
        self._after_read(values)
        if hasattr(self._optimizer, "nonfinite_loss_steps"):
            values["nonfinite_loss_steps"] = _nonfinite_loss_steps(self._optimizer)
            self._warn_nonfinite_loss(epoch, values["nonfinite_loss_steps"])
        if logs is not None:
            logs.update(values)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._optimizer = None

    # ------------------------------------------------------------ helpers
    def _first_read_after(self) -> int | None:
        """Steps into `fit` of the first read during an epoch, or None.

        With `check_every=None`, after the first step: a resumed run may start
        with skipped steps in a row (restored after `on_train_begin`).
        """
        if self.check_every is not None:
            return self.check_every
        stop_check = (self.max_consecutive_skips is not None
                      and hasattr(self._optimizer, "consecutive_skipped_steps"))
        return 1 if stop_check else None

    def _next_read_after(self, consecutive: int | None) -> int | None:
        """Steps from a read (that saw `consecutive` skips in a row) to the next, or None."""
        if self.check_every is not None:
            return self.check_every
        if self.max_consecutive_skips is None or consecutive is None:
            return None
        return max(1, self.max_consecutive_skips - consecutive)

    def _count_steps(self, batch: int) -> bool:
        """Counts the steps up to `batch` (the last of its execution); whether a read is due."""
        self._unread_steps += batch - self._last_batch
        self._last_batch = batch
        due = self._steps_to_next_read
        return due is not None and self._unread_steps >= due

    def _read(self) -> dict | None:
        """The logged counters, copied from the device; None before the optimizer is built."""
        opt = _loss_scale_optimizer(self.model)  # on JAX, `model` first syncs fit's state back
        if opt is None or not opt.built:
            return None
        scale = getattr(opt, "loss_scale", opt.dynamic_scale)  # tfmp's is 1.0 when disabled
        values = {"loss_scale": float(ops.convert_to_numpy(scale))}
        if hasattr(opt, "skipped_steps"):
            values["skipped_steps"] = _read_int(opt.skipped_steps)
        return values

    def _after_read(self, values: dict) -> None:
        """Schedules the next read, writes the TensorBoard points and stops a hopeless run."""
        opt = self._optimizer
        consecutive = (_read_int(opt.consecutive_skipped_steps)
                       if hasattr(opt, "consecutive_skipped_steps") else None)
        self._unread_steps = 0
        self._steps_to_next_read = self._next_read_after(consecutive)
        if self._writer is not None:
            self._write(opt, values)
        self._check_hopeless(opt, values, consecutive)

    def _write(self, opt, values: dict) -> None:
        step = _read_int(opt.iterations) + values.get("skipped_steps", 0)
        if step == self._last_written_step:  # read at the last batch, then at the epoch end
            return
        self._last_written_step = step
        tf = _tf.import_tensorflow(_WRITER_FEATURE)
        with self._writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def _warn_nonfinite_loss(self, epoch: int, total: int) -> None:
        new = total - self._nonfinite_loss_at_epoch_start
        if new > 0:
            logging.getLogger("tfmp").warning(
                "epoch %d: %d skipped step(s) had a non-finite loss: inf/NaN in the data "
                "or in the forward pass, not a loss-scale overflow (check the data, e.g. "
                "with python -m tools.audit)", epoch + 1, new)

    def _check_hopeless(self, opt, values: dict, consecutive: int | None) -> None:
        if self.max_consecutive_skips is None or consecutive is None:
            return
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

    Counts the steps from the batch indices Keras passes, not from the number
    of calls: with `steps_per_execution > 1` the batch hooks run once per
    execution, with the index of its last step. A last execution cut short by
    the end of the data counts the steps the epoch has (`params["steps"]`,
    where Keras knows it). Keras runs whole executions: with a `steps_per_epoch`
    that is not a multiple of `steps_per_execution` it runs more steps than
    that, and this counts `steps_per_epoch`. The time runs from the epoch's
    start to its last training batch (validation excluded); it reads nothing
    from the device.

    Args:
        batch_size: Global examples per step.

    Raises:
        ValueError: for a `batch_size` that is not an integer >= 1.

    Example:

        model.fit(ds, callbacks=[tfmp.callbacks.Throughput(batch_size=256)])
    """

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = _checks.integer("batch_size", batch_size)
        self._start = self._end = 0.0
        self._last_batch = -1

    @classmethod
    def from_config(cls, config: dict) -> Throughput:
        return cls(**config)

    def get_config(self) -> dict:
        return {"batch_size": self.batch_size}

    def on_epoch_begin(self, epoch, logs=None):
        self._start = self._end = time.perf_counter()
        self._last_batch = -1

    def on_train_batch_end(self, batch, logs=None):
        self._last_batch = batch  # the last step of the execution
        self._end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        steps, elapsed = self._steps_run(), self._end - self._start
        if logs is not None and steps > 0 and elapsed > 0:
            logs["examples_per_second"] = steps * self.batch_size / elapsed

    def _steps_run(self) -> int:
        """Steps run in this epoch: the last batch index + 1, capped at the epoch's steps."""
        steps = self._last_batch + 1
        known = (self.params or {}).get("steps")
        return min(steps, known) if known else steps
