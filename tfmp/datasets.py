"""The recipes' dataset names and what each one is (no TensorFlow needed).

`tfmp.data` builds their pipelines (TensorFlow only) and re-exports these names;
`tfmp.run_config` checks a run's `dataset` against them.

Example:

    validate_dataset_name("imdb_reviews", kind="text")
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class _Spec:
    kind: str  # "image" or "text".
    num_classes: int
    eval_split: str
    tfds_name: str | None = None  # None: synthetic, in memory.
    augment: str = "pad_crop"  # Images: "pad_crop" (CIFAR-style) or "resized_crop" (ImageNet).


_SPECS = {
    "synthetic": _Spec("image", 10, "test"),
    "cifar10": _Spec("image", 10, "test", "cifar10"),
    "imagenet2012": _Spec("image", 1000, "validation", "imagenet2012", "resized_crop"),
    "synthetic_text": _Spec("text", 2, "test"),
    "imdb_reviews": _Spec("text", 2, "test", "imdb_reviews"),
}
IMAGE_DATASETS = tuple(name for name, spec in _SPECS.items() if spec.kind == "image")
TEXT_DATASETS = tuple(name for name, spec in _SPECS.items() if spec.kind == "text")
DATASETS = IMAGE_DATASETS + TEXT_DATASETS


def validate_dataset_name(name: str, *, kind: str | None = None, argument: str = "dataset") -> str:
    """Returns `name` if it is a known dataset (of `kind`, if given), else raises `ValueError`.

    Args:
        name: The dataset name to check.
        kind: `"image"` or `"text"` to accept only that kind; `None` accepts both.
        argument: The argument name to quote in the error message.

    Returns:
        `name`, unchanged.

    Example:

        >>> validate_dataset_name("cifar10", kind="image")
        'cifar10'
    """
    allowed = {None: DATASETS, "image": IMAGE_DATASETS, "text": TEXT_DATASETS}[kind]
    if name not in allowed:
        what = {None: "a dataset", "image": "an image dataset", "text": "a text dataset"}[kind]
        raise ValueError(
            f"Unknown `{argument}`: {name!r}. Expected {what}, one of: {', '.join(allowed)}."
        )
    return name
