"""Train an image classifier with mixed precision.

python -m recipes.image_classification --dataset=synthetic --epochs=2 --export_dir=/tmp/export
python -m recipes.image_classification --dataset=cifar10 --model=resnet50 --policy=mixed_float16 \
    --batch_size=256 --epochs=30 --model_dir=runs/cifar10 --distribution=mirrored
python -m recipes.image_classification --dataset=cifar10 --batch_size=256 --steps_per_execution=8

The shared flags are `tfmp.run_config.FLAGS`; README.md has the ResNet-50 ImageNet command.
"""

import tfmp

try:  # TensorFlow only: without it, one `error:` line that says what to install.
    from tfmp import data, run_config, training  # noqa: F401 (used as tfmp.<module>)
except ImportError as e:
    tfmp.cli.exit_on_import_error(e, __name__)

NAME = "image_classification"
DEFAULTS = dict(dataset="synthetic", batch_size=128, epochs=10)
_RUN_FLAGS = tfmp.run_config.define_flags(**DEFAULTS)
_MODEL_FLAGS = tfmp.cli.define_flags({
    "model": (str, "resnet_mini", f"One of: {', '.join(tfmp.models.IMAGE_MODELS)}."),
    "image_size": (int, 32, "Side of the square input images."),
})


def config(**settings) -> tfmp.run_config.RunConfig:
    """This recipe's `RunConfig`: its defaults, then `settings` (by flag name)."""
    return tfmp.run_config.RunConfig.from_flat({"recipe": NAME, **DEFAULTS, **settings})


def run(config: tfmp.run_config.RunConfig, *, model: str = "resnet_mini", image_size: int = 32,
        dataset_override=None, verbose: int = 2) -> dict:
    """Trains and evaluates `model` on `config.dataset`; see `tfmp.training.train_and_evaluate`.

    Args:
        config: The run's settings (`config(...)` makes one with this recipe's defaults).
        model: One of `tfmp.models.IMAGE_MODELS`.
        image_size: Side of the square input images.
        dataset_override: `(train, eval)` datasets that replace the named dataset (tests).
        verbose: Keras `fit` verbosity.

    Returns:
        The metrics dict of `tfmp.training.train_and_evaluate`.

    Raises:
        tfmp.cli.UsageError: for a bad argument, before any model or dataset is built.
    """
    with tfmp.cli.usage_errors():
        tfmp.models.validate_image_model(model, image_size=image_size)
    tfmp.training.prepare(config, {"model": model, "image_size": image_size})
    with tfmp.cli.usage_errors():
        info = tfmp.data.dataset_info(config.dataset, image_size=image_size)
        train, evaluation = dataset_override or (tfmp.data.image_dataset(
            config.dataset, split, training=training, batch_size=config.batch_size,
            image_size=image_size, data_dir=config.data_dir, seed=config.seed,
            num_examples_synthetic=config.num_synthetic)
            for split, training in ((info.train_split, True), (info.eval_split, False)))
    return tfmp.training.train_and_evaluate(
        config, lambda: tfmp.models.image_classifier(model, info.input_shape, info.num_classes),
        train, evaluation, verbose=verbose)


def main(argv):
    tfmp.cli.check_no_arguments(argv)
    return tfmp.training.run_main(run, NAME, _RUN_FLAGS, _MODEL_FLAGS)


if __name__ == "__main__":
    tfmp.cli.run(main)
