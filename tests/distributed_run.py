"""A small, exactly reproducible training run for the distribution tests.

Every step trains on the same global batch whatever the strategy; Keras splits
it so that replica r of R gets rows [r*B/R, (r+1)*B/R) (MirroredStrategy splits
each batch; MultiWorkerMirroredStrategy rebatches, then shards by element).
Run in-process (`train(strategy)`) or as a worker:

    python -m tools.launch_local --num_workers=2 -- \
        python -m tests.distributed_run --out_dir=/tmp/mw --nan_replica=1 --nan_step=2
"""

import json
import os
import sys

import numpy as np

STEPS, GLOBAL_BATCH = 4, 16


def _rows(step, replica, replicas):
    per = GLOBAL_BATCH // replicas
    start = step * GLOBAL_BATCH + replica * per
    return slice(start, start + per)


def train(strategy, *, clipnorm=None, nan_replica=None, nan_step=None, policy="float32",
          enabled=True):
    """Trains a small Dense model for STEPS steps; returns (weights, optimizer state)."""
    import keras
    import tensorflow as tf

    import tfmp

    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * GLOBAL_BATCH, 4)).astype("float32")
    y = (x @ np.array([1.0, -2.0, 0.5, 3.0], "float32"))[:, None]
    if nan_replica is not None:
        x[_rows(nan_step, nan_replica, strategy.num_replicas_in_sync).start, 0] = np.nan
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    data = data.with_options(options)

    with tfmp.policy_scope(policy), strategy.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(1, dtype="float32")])
        opt = tfmp.LossScaleOptimizer(keras.optimizers.SGD(0.05, global_clipnorm=clipnorm),
                                      initial_scale=2.0**8, enabled=enabled)
        model.compile(optimizer=opt, loss="mse")
    with tfmp.distribute.keras_fit_scope(model, strategy):
        model.fit(data, epochs=1, steps_per_epoch=STEPS, verbose=0, shuffle=False)
    state = {name: float(keras.ops.convert_to_numpy(value)) for name, value in (
        ("loss_scale", opt.loss_scale), ("skipped_steps", opt.skipped_steps),
        ("iterations", opt.iterations))}
    return model.get_weights(), state


def main():
    from absl import flags

    flags.DEFINE_string("out_dir", None, "Where each worker writes worker<i>.npz/.json.")
    flags.DEFINE_float("clipnorm", None, "global_clipnorm of the inner optimizer.")
    flags.DEFINE_integer("nan_replica", None, "Replica whose batch gets a NaN.")
    flags.DEFINE_integer("nan_step", 0, "Step at which it does.")
    flags.FLAGS(sys.argv)
    import tfmp

    strategy = tfmp.distribute.create_strategy("multi_worker")
    weights, state = train(strategy, clipnorm=flags.FLAGS.clipnorm,
                           nan_replica=flags.FLAGS.nan_replica, nan_step=flags.FLAGS.nan_step)
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    out = os.path.join(flags.FLAGS.out_dir, f"worker{index}")
    np.savez(out + ".npz", *weights)
    with open(out + ".json", "w") as f:
        json.dump(state, f)


if __name__ == "__main__":
    main()
