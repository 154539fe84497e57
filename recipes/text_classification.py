"""Train a Transformer text classifier, built from tfmp's float32-safe layers, with mixed precision.

python -m recipes.text_classification --dataset=synthetic_text --epochs=2
python -m recipes.text_classification --dataset=imdb_reviews --data_dir=~/tensorflow_datasets \
    --seq_len=256 --batch_size=64 --epochs=5 --model_dir=runs/imdb
"""

import keras
from absl import flags

import tfmp

try:  # TensorFlow only: without it, one `error:` line that says what to install.
    from tfmp import data, training  # noqa: F401 (used as tfmp.data, tfmp.training)
except ImportError as e:
    tfmp.cli.exit_on_import_error(e, __name__)

_FLAGS = tfmp.training.define_flags(datasets=tfmp.data.TEXT_DATASETS,
                                    default_dataset="synthetic_text", default_batch_size=64,
                                    default_epochs=5, default_learning_rate=3e-4)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per example.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 20_000, "Hashed vocabulary size.")
_EMBED_DIM = flags.DEFINE_integer("embed_dim", 64, "Model width (a multiple of 8).")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "Attention heads.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 2, "Encoder blocks.")


def run(*, policy: str = "mixed_float16", loss_scale: str = "dynamic",
        dataset: str = "synthetic_text", data_dir: str | None = None, batch_size: int = 64,
        epochs: int = 5, steps_per_epoch: int | None = None, learning_rate: float = 3e-4,
        jit_compile: str | bool = "auto", steps_per_execution: int = 1,
        distribution: str = "none", model_dir: str | None = None,
        export_dir: str | None = None, seed: int = 0, seq_len: int = 128,
        vocab_size: int = 20_000, embed_dim: int = 64, num_heads: int = 4, num_layers: int = 2,
        num_synthetic: int = 2048, cpu_replicas: int = 1, dataset_override=None,
        verbose: int = 2) -> dict:
    """Trains and evaluates the Transformer classifier; see `tfmp.training.train_and_evaluate`.

    Args:
        dataset_override: `(train, eval)` datasets that replace the named dataset (tests).
        Others: as the flags of the same names.

    Returns:
        The metrics dict of `tfmp.training.train_and_evaluate`.

    Raises:
        tfmp.cli.UsageError: for a bad argument, before any model is built.
    """
    tfmp.training.prepare(policy=policy, loss_scale=loss_scale, dataset=dataset,
                          datasets=tfmp.data.TEXT_DATASETS, batch_size=batch_size,
                          epochs=epochs, steps_per_epoch=steps_per_epoch,
                          learning_rate=learning_rate, distribution=distribution, seed=seed,
                          model_dir=model_dir, export_dir=export_dir,
                          num_synthetic=num_synthetic, cpu_replicas=cpu_replicas,
                          steps_per_execution=steps_per_execution, jit_compile=jit_compile)
    with tfmp.cli.usage_errors():
        info = tfmp.data.dataset_info(dataset, seq_len=seq_len)
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads),
                            ("num_layers", num_layers)):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1. Received: {name}={value}")
        if embed_dim % num_heads:
            raise ValueError(f"`num_heads` must divide `embed_dim` ({embed_dim}). "
                             f"Received: num_heads={num_heads}")
        if dataset_override is not None:
            train, evaluation = dataset_override
        else:
            common = dict(batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size,
                          data_dir=data_dir, seed=seed, num_examples_synthetic=num_synthetic)
            train = tfmp.data.text_dataset(dataset, info.train_split, training=True, **common)
            evaluation = tfmp.data.text_dataset(dataset, info.eval_split, training=False,
                                                **common)
    keras.utils.set_random_seed(seed)
    return tfmp.training.train_and_evaluate(
        lambda: tfmp.models.text_classifier(seq_len, vocab_size, info.num_classes,
                                            embed_dim=embed_dim, num_heads=num_heads,
                                            num_layers=num_layers),
        train, evaluation, policy=policy, loss_scale=loss_scale, learning_rate=learning_rate,
        epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
        jit_compile=jit_compile, steps_per_execution=steps_per_execution,
        distribution=distribution, model_dir=model_dir,
        export_dir=export_dir, verbose=verbose,
        model_settings={"recipe": "text_classification", "dataset": dataset,
                        "seq_len": seq_len, "vocab_size": vocab_size, "embed_dim": embed_dim,
                        "num_heads": num_heads, "num_layers": num_layers})


def main(argv):
    tfmp.cli.check_no_arguments(argv)
    return tfmp.training.run_main(
        run, tfmp.training.flag_values(_FLAGS), seq_len=_SEQ_LEN.value,
        vocab_size=_VOCAB_SIZE.value, embed_dim=_EMBED_DIM.value, num_heads=_NUM_HEADS.value,
        num_layers=_NUM_LAYERS.value)


if __name__ == "__main__":
    tfmp.cli.run(main)
