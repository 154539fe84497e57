"""Train a Transformer text classifier, built from tfmp's float32-safe layers, with mixed precision.

python -m recipes.text_classification --dataset=synthetic_text --epochs=2
python -m recipes.text_classification --dataset=imdb_reviews --data_dir=~/tensorflow_datasets \
    --seq_len=256 --batch_size=64 --epochs=5 --model_dir=runs/imdb

The shared flags are `tfmp.run_config.FLAGS`; README.md has a BERT-base-shaped command.
"""

import tfmp

try:  # TensorFlow only: without it, one `error:` line that says what to install.
    from tfmp import data, run_config, training  # noqa: F401 (used as tfmp.<module>)
except ImportError as e:
    tfmp.cli.exit_on_import_error(e, __name__)

NAME = "text_classification"
DEFAULTS = dict(dataset="synthetic_text", batch_size=64, epochs=5, learning_rate=3e-4)
_RUN_FLAGS = tfmp.run_config.define_flags(**DEFAULTS)
_MODEL_FLAGS = tfmp.cli.define_flags({
    "seq_len": (int, 128, "Tokens per example."),
    "vocab_size": (int, 20_000, "Hashed vocabulary size."),
    "embed_dim": (int, 64, "Model width (a multiple of 8)."),
    "num_heads": (int, 4, "Attention heads."),
    "num_layers": (int, 2, "Encoder blocks."),
    "ff_dim": (int, 128, "Hidden units of each feed-forward block."),
    "dropout": (float, 0.1, "Dropout rate of attention and feed-forward blocks."),
})


def config(**settings) -> tfmp.run_config.RunConfig:
    """This recipe's `RunConfig`: its defaults, then `settings` (by flag name)."""
    return tfmp.run_config.RunConfig.from_flat({"recipe": NAME, **DEFAULTS, **settings})


def run(config: tfmp.run_config.RunConfig, *, seq_len: int = 128, vocab_size: int = 20_000,
        embed_dim: int = 64, num_heads: int = 4, num_layers: int = 2, ff_dim: int = 128,
        dropout: float = 0.1, dataset_override=None, verbose: int = 2) -> dict:
    """Trains and evaluates the Transformer classifier; see `tfmp.training.train_and_evaluate`.

    Args:
        config: The run's settings (`config(...)` makes one with this recipe's defaults).
        seq_len, vocab_size, embed_dim, num_heads, num_layers, ff_dim, dropout: The
            model's shape and dropout (`tfmp.models.text_classifier`).
        dataset_override: `(train, eval)` datasets that replace the named dataset (tests).
        verbose: Keras `fit` verbosity.

    Returns:
        The metrics dict of `tfmp.training.train_and_evaluate`.

    Raises:
        tfmp.cli.UsageError: for a bad argument, before any model is built.
    """
    shape = dict(embed_dim=embed_dim, num_heads=num_heads, num_layers=num_layers, ff_dim=ff_dim,
                 dropout=dropout)
    with tfmp.cli.usage_errors():
        tfmp.models.validate_text_model(seq_len=seq_len, vocab_size=vocab_size, **shape)
    tfmp.training.prepare(config, {"seq_len": seq_len, "vocab_size": vocab_size, **shape})
    with tfmp.cli.usage_errors():
        info = tfmp.data.dataset_info(config.dataset, seq_len=seq_len)
        train, evaluation = dataset_override or (tfmp.data.text_dataset(
            config.dataset, split, training=training, batch_size=config.batch_size,
            seq_len=seq_len, vocab_size=vocab_size, data_dir=config.data_dir, seed=config.seed,
            num_examples_synthetic=config.num_synthetic)
            for split, training in ((info.train_split, True), (info.eval_split, False)))
    return tfmp.training.train_and_evaluate(
        config, lambda: tfmp.models.text_classifier(seq_len, vocab_size, info.num_classes,
                                                    **shape),
        train, evaluation, verbose=verbose)


def main(argv):
    tfmp.cli.check_no_arguments(argv)
    return tfmp.training.run_main(run, NAME, _RUN_FLAGS, _MODEL_FLAGS)


if __name__ == "__main__":
    tfmp.cli.run(main)
