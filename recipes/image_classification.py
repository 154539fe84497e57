"""Train an image classifier with mixed precision.

python -m recipes.image_classification --dataset=synthetic --epochs=2 --export_dir=/tmp/export
python -m recipes.image_classification --dataset=cifar10 --model=resnet50 --policy=mixed_float16 \
    --batch_size=256 --epochs=30 --model_dir=runs/cifar10 --distribution=mirrored
python -m recipes.image_classification --dataset=cifar10 --batch_size=256 --steps_per_execution=8
"""

import keras
from absl import flags

import tfmp

try:  # TensorFlow only: without it, one `error:` line that says what to install.
    from tfmp import data, training  # noqa: F401 (used as tfmp.data, tfmp.training)
except ImportError as e:
    tfmp.cli.exit_on_import_error(e, __name__)

_FLAGS = tfmp.training.define_flags(datasets=tfmp.data.IMAGE_DATASETS,
                                    default_dataset="synthetic", default_batch_size=128,
                                    default_epochs=10)
_MODEL = flags.DEFINE_string("model", "resnet_mini",
                             f"One of: {', '.join(tfmp.models.IMAGE_MODELS)}.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Side of the square input images.")


def run(*, policy: str = "mixed_float16", loss_scale: str = "dynamic", dataset: str = "synthetic",
        data_dir: str | None = None, batch_size: int = 128, epochs: int = 10,
        steps_per_epoch: int | None = None, learning_rate: float = 1e-3,
        jit_compile: str | bool = "auto", steps_per_execution: int = 1,
        distribution: str = "none", model_dir: str | None = None,
        export_dir: str | None = None, seed: int = 0, model: str = "resnet_mini",
        image_size: int = 32, num_synthetic: int = 2048, cpu_replicas: int = 1,
        dataset_override=None, verbose: int = 2) -> dict:
    """Trains and evaluates `model` on `dataset`; see `tfmp.training.train_and_evaluate`.

    Args:
        dataset_override: `(train, eval)` datasets that replace the named dataset (tests).
        Others: as the flags of the same names.

    Returns:
        The metrics dict of `tfmp.training.train_and_evaluate`.

    Raises:
        tfmp.cli.UsageError: for a bad argument, before any model or dataset is built.
    """
    with tfmp.cli.usage_errors():
        tfmp.models.validate_image_model(model, image_size=image_size)
    tfmp.training.prepare(policy=policy, loss_scale=loss_scale, dataset=dataset,
                          datasets=tfmp.data.IMAGE_DATASETS, batch_size=batch_size,
                          epochs=epochs, steps_per_epoch=steps_per_epoch,
                          learning_rate=learning_rate, distribution=distribution, seed=seed,
                          model_dir=model_dir, export_dir=export_dir,
                          num_synthetic=num_synthetic, cpu_replicas=cpu_replicas,
                          steps_per_execution=steps_per_execution, jit_compile=jit_compile)
    with tfmp.cli.usage_errors():
        info = tfmp.data.dataset_info(dataset, image_size=image_size)
        if dataset_override is not None:
            train, evaluation = dataset_override
        else:
            common = dict(batch_size=batch_size, image_size=image_size, data_dir=data_dir,
                          seed=seed, num_examples_synthetic=num_synthetic)
            train = tfmp.data.image_dataset(dataset, info.train_split, training=True, **common)
            evaluation = tfmp.data.image_dataset(dataset, info.eval_split, training=False,
                                                 **common)
    keras.utils.set_random_seed(seed)
    return tfmp.training.train_and_evaluate(
        lambda: tfmp.models.image_classifier(model, info.input_shape, info.num_classes),
        train, evaluation, policy=policy, loss_scale=loss_scale, learning_rate=learning_rate,
        epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
        jit_compile=jit_compile, steps_per_execution=steps_per_execution,
        distribution=distribution, model_dir=model_dir,
        export_dir=export_dir, verbose=verbose,
        model_settings={"recipe": "image_classification", "model": model,
                        "image_size": image_size, "dataset": dataset})


def main(argv):
    tfmp.cli.check_no_arguments(argv)
    return tfmp.training.run_main(run, tfmp.training.flag_values(_FLAGS), model=_MODEL.value,
                                  image_size=_IMAGE_SIZE.value)


if __name__ == "__main__":
    tfmp.cli.run(main)
