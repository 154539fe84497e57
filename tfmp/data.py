"""Input pipelines for the recipes: synthetic, CIFAR-10, ImageNet and IMDB reviews.

TensorFlow-specific: builds `tf.data` pipelines and reads TensorFlow Datasets (TFDS,
imported only when a real dataset is asked for; nothing is ever downloaded). Images
come out float32 in [0, 1], shaped `(image_size, image_size, 3)`; text comes out as
int32 token ids shaped `(seq_len,)`, 0 being padding; labels are int32. The synthetic
datasets need no files and are learnable: their labels are a function of the inputs.

Example:

    from tfmp import data
    info = data.dataset_info("synthetic", image_size=32)
    train = data.image_dataset("synthetic", info.train_split, batch_size=64,
                               image_size=32, training=True, seed=0)
    model.fit(train, epochs=2)  # model: info.input_shape in, info.num_classes out
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from tfmp import _checks, _tf
from tfmp.datasets import (  # noqa: F401 (re-exported)
    _SPECS,
    DATASETS,
    IMAGE_DATASETS,
    TEXT_DATASETS,
    _Spec,
    validate_dataset_name,
)

tf = _tf.import_tensorflow('tfmp.data')

_AUTOTUNE = tf.data.AUTOTUNE
_SHUFFLE_BUFFER = 10_000
_TEMPLATE_SEED = 1234  # Class templates and marker tokens: the same for every seed and split.
_GRID = 4  # Synthetic templates are 4x4 colour blocks, which survive crops and flips.
_MARKERS_PER_CLASS = 8
_CROP_PADDING = 32  # ImageNet eval centre crop keeps image_size / (image_size + 32).


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    Attributes:
        name: One of `DATASETS`.
        num_classes: Labels are int32 in `[0, num_classes)`.
        input_shape: One input's shape: `(image_size, image_size, 3)` or `(seq_len,)`.
        input_dtype: `"float32"` for images, `"int32"` for token ids.
        train_split: The split to train on.
        eval_split: The split to evaluate on.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    input_dtype: str
    train_split: str
    eval_split: str


def _check_int(argument: str, value: int, minimum: int = 1) -> None:
    _checks.integer(argument, value, minimum)


def dataset_info(name: str, *, image_size: int = 32, seq_len: int = 256) -> DatasetInfo:
    """Describes a dataset for building a model.

    Args:
        name: One of `DATASETS`.
        image_size: Side of the square images (image datasets).
        seq_len: Tokens per example (text datasets).

    Returns:
        A `DatasetInfo`; e.g. `dataset_info("imdb_reviews", seq_len=128).input_shape`
        is `(128,)`.
    """
    spec = _SPECS[validate_dataset_name(name)]
    if spec.kind == "image":
        _check_int("image_size", image_size)
        return DatasetInfo(name, spec.num_classes, (image_size, image_size, 3), "float32",
                           "train", spec.eval_split)
    _check_int("seq_len", seq_len)
    return DatasetInfo(name, spec.num_classes, (seq_len,), "int32", "train", spec.eval_split)


def synthetic_images(
    num_examples: int, image_size: int = 32, num_classes: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """An in-memory, learnable image classification set.

    Each class has a fixed template, 3/4 a class colour and 1/4 a random 4x4 colour
    pattern scaled up to `image_size`; an example is its class template plus Gaussian
    noise (std 0.25), clipped to [0, 1]. Templates depend only on `image_size` and
    `num_classes`: another `seed` draws new examples of the same classes.

    Args:
        num_examples: Number of examples.
        image_size: Side of the square RGB images.
        num_classes: Number of classes, at least 2.
        seed: Seed of the examples and labels.

    Returns:
        `(x, y)`: float32 images `(num_examples, image_size, image_size, 3)` and int32
        labels `(num_examples,)`; e.g. `synthetic_images(8, image_size=16)[0].shape`
        is `(8, 16, 16, 3)`.
    """
    _check_int("num_examples", num_examples)
    _check_int("image_size", image_size)
    _check_int("num_classes", num_classes, 2)
    rng = np.random.default_rng(_TEMPLATE_SEED)
    colour = rng.uniform(size=(num_classes, 1, 1, 3))
    pattern = rng.uniform(size=(num_classes, _GRID, _GRID, 3))
    scale = -(-image_size // _GRID)
    pattern = pattern.repeat(scale, axis=1).repeat(scale, axis=2)[:, :image_size, :image_size]
    templates = (0.75 * colour + 0.25 * pattern).astype(np.float32)
    rng = np.random.default_rng(seed)
    y = rng.integers(num_classes, size=num_examples).astype(np.int32)
    noise = rng.standard_normal((num_examples, image_size, image_size, 3), dtype=np.float32)
    return np.clip(templates[y] + 0.25 * noise, 0.0, 1.0), y


def synthetic_text(
    num_examples: int, seq_len: int = 64, vocab_size: int = 1000, num_classes: int = 2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """An in-memory, learnable text classification set.

    Each class owns 8 marker tokens (fixed for a `vocab_size` and `num_classes`). An
    example is random filler tokens (never markers, never 0) with `max(1, seq_len // 8)`
    markers of its class at random positions: the label is the class whose markers occur.

    Args:
        num_examples: Number of examples.
        seq_len: Tokens per example.
        vocab_size: Ids lie in `[1, vocab_size)`; at least `8 * num_classes + 2`.
        num_classes: Number of classes, at least 2.
        seed: Seed of the examples and labels.

    Returns:
        `(x, y)`: int32 ids `(num_examples, seq_len)` and int32 labels; e.g.
        `synthetic_text(4, seq_len=16, vocab_size=100)[0].shape` is `(4, 16)`.
    """
    _check_int("num_examples", num_examples)
    _check_int("seq_len", seq_len)
    _check_int("num_classes", num_classes, 2)
    _check_int("vocab_size", vocab_size, _MARKERS_PER_CLASS * num_classes + 2)
    ids = np.random.default_rng(_TEMPLATE_SEED).permutation(np.arange(1, vocab_size))
    markers = ids[: _MARKERS_PER_CLASS * num_classes].reshape(num_classes, _MARKERS_PER_CLASS)
    filler = ids[_MARKERS_PER_CLASS * num_classes :]
    rng = np.random.default_rng(seed)
    y = rng.integers(num_classes, size=num_examples).astype(np.int32)
    x = filler[rng.integers(len(filler), size=(num_examples, seq_len))]
    count = max(1, seq_len // 8)
    positions = np.argsort(rng.random((num_examples, seq_len)), axis=1)[:, :count]
    chosen = markers[y[:, None], rng.integers(_MARKERS_PER_CLASS, size=(num_examples, count))]
    np.put_along_axis(x, positions, chosen, axis=1)
    return x.astype(np.int32), y


def hash_tokenize(text: tf.Tensor | str, *, seq_len: int, vocab_size: int) -> tf.Tensor:
    """Splits text into lower-case words and hashes each into `[1, vocab_size)`.

    No vocabulary to fit or ship: the same function tokenizes for training and serving.

    Args:
        text: A string scalar or a 1-D batch of strings.
        seq_len: Tokens per text: longer texts are cut, shorter ones zero-padded.
        vocab_size: Number of ids, 0 (padding) included; at least 2.

    Returns:
        int32 ids shaped `(seq_len,)`, or `(batch, seq_len)` for a batch; e.g.
        `hash_tokenize("Great film!", seq_len=4, vocab_size=100)` is `[a, b, 0, 0]`.
    """
    _check_int("seq_len", seq_len)
    _check_int("vocab_size", vocab_size, 2)
    text = tf.convert_to_tensor(text, dtype=tf.string)
    words = tf.strings.lower(tf.reshape(text, [-1]))
    words = tf.strings.split(tf.strings.regex_replace(words, r"<br\s*/?>|[^a-z0-9']+", " "))
    ids = tf.ragged.map_flat_values(tf.strings.to_hash_bucket_fast, words, vocab_size - 1) + 1
    ids = tf.cast(ids.to_tensor(0, shape=[None, seq_len]), tf.int32)
    return ids if text.shape.rank == 1 else ids[0]


def _load_tfds(spec: _Spec, split: str, data_dir: str | None, training: bool, seed: int,
               decoders=None) -> tf.data.Dataset:
    import tensorflow_datasets as tfds

    try:
        return tfds.load(
            spec.tfds_name, split=split, data_dir=data_dir, as_supervised=True, download=False,
            shuffle_files=training, read_config=tfds.ReadConfig(shuffle_seed=seed),
            decoders=decoders)
    except AssertionError as e:
        if "could not find data" not in str(e):  # TFDS' words for "not prepared".
            raise
        where = os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)
        manual = ""
        if spec.tfds_name == "imagenet2012":
            manual_dir = os.path.join(where, "downloads", "manual")
            manual = (", after downloading ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
                      f"(image-net.org) manually into {manual_dir}/")
        raise FileNotFoundError(
            f"Dataset {spec.tfds_name!r} not found in data_dir={where}; prepare it with: "
            f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{spec.tfds_name}', "
            f"data_dir='{where}').download_and_prepare()\"{manual}") from e


def _synthetic_seed(spec: _Spec, split: str, seed: int) -> int:
    """Train and eval splits draw different examples of the same classes."""
    if split not in ("train", spec.eval_split):
        raise ValueError(f"Unknown `split`: {split!r}. Expected one of: train, {spec.eval_split}.")
    return 2 * seed + (split != "train")


def _batch(ds: tf.data.Dataset, batch_size: int, training: bool) -> tf.data.Dataset:
    ds = ds.batch(batch_size, drop_remainder=training)
    return ds.map(lambda x, y: (x, tf.cast(y, tf.int32)), _AUTOTUNE).prefetch(_AUTOTUNE)


def _with_seeds(ds: tf.data.Dataset, seed: int) -> tf.data.Dataset:
    """Pairs each element with a `[2, 2]` stateless seed: deterministic under parallel maps."""
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    return tf.data.Dataset.zip(ds, seeds.map(lambda s: tf.random.split(s, 2)))


def _resize(image, image_size: int):
    """Resizes a statically shaped image, keeping its dtype: uint8 caches 4x smaller."""
    if tuple(image.shape[:2]) == (image_size, image_size):
        return image
    resized = tf.image.resize(image, (image_size, image_size))
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), image.dtype)


def _to_float(image, image_size: int):
    del image_size  # Resized before the cache.
    return tf.image.convert_image_dtype(image, tf.float32)


def _pad_crop_flip(image, seeds, image_size: int):
    pad = image_size // 8
    image = tf.pad(_to_float(image, image_size), [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, (image_size, image_size, 3), seed=seeds[0])
    return tf.image.stateless_random_flip_left_right(image, seed=seeds[1])


def _decode_crop_resize(jpeg, window, image_size: int):
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    return tf.image.resize(tf.image.convert_image_dtype(image, tf.float32), (image_size,) * 2)


def _resized_crop_flip(jpeg, seeds, image_size: int):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(jpeg), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seeds[0],
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = _decode_crop_resize(jpeg, window, image_size)
    return tf.image.stateless_random_flip_left_right(image, seed=seeds[1])


def _center_crop(jpeg, image_size: int):
    shape = tf.image.extract_jpeg_shape(jpeg)
    short_side = tf.cast(tf.minimum(shape[0], shape[1]), tf.float32)
    side = tf.cast(image_size / (image_size + _CROP_PADDING) * short_side, tf.int32)
    window = tf.stack([(shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side])
    return _decode_crop_resize(jpeg, window, image_size)


def image_dataset(
    name: str, split: str, *, batch_size: int, image_size: int = 32, data_dir: str | None = None,
    training: bool, seed: int = 0, num_examples_synthetic: int = 2048,
) -> tf.data.Dataset:
    """Batches of `(image, label)` for image classification.

    Training pipelines are shuffled and augmented deterministically from `seed`: pad by
    `image_size // 8`, random crop and flip for `synthetic` and `cifar10`; random resized
    crop and flip for `imagenet2012`, whose eval images are centre-cropped. Only training
    drops the last partial batch.

    Args:
        name: One of `IMAGE_DATASETS`.
        split: A TFDS split (`"train"`, `"train[:90%]"`...); `"train"` or `"test"` for
            `synthetic`.
        batch_size: Examples per batch.
        image_size: Side of the square output images.
        data_dir: TFDS data directory; `None` for TFDS' default.
        training: Whether to shuffle, augment and drop the last partial batch.
        seed: Seed of the shuffle, the augmentation and the synthetic examples.
        num_examples_synthetic: Size of a `synthetic` split.

    Returns:
        A `tf.data.Dataset` of float32 images in [0, 1] and int32 labels; e.g.
        `image_dataset("synthetic", "train", batch_size=8, training=True)`.

    Raises:
        ValueError: For an unknown name or split, or a bad size.
        FileNotFoundError: When the TFDS dataset is not prepared in `data_dir`.
    """
    spec = _SPECS[validate_dataset_name(name, kind="image")]
    _check_int("batch_size", batch_size)
    _check_int("image_size", image_size)
    if spec.tfds_name is None:
        x, y = synthetic_images(num_examples_synthetic, image_size, spec.num_classes,
                                _synthetic_seed(spec, split, seed))
        ds = tf.data.Dataset.from_tensor_slices((x, y))
    elif spec.augment == "pad_crop":
        ds = _load_tfds(spec, split, data_dir, training, seed)
        ds = ds.map(lambda x, y: (_resize(x, image_size), y), _AUTOTUNE).cache()
    else:  # ImageNet: too big to cache; shuffle the JPEG bytes, decode after.
        import tensorflow_datasets as tfds

        skip = {"image": tfds.decode.SkipDecoding()}
        ds = _load_tfds(spec, split, data_dir, training, seed, decoders=skip)
    if training:
        augment = _pad_crop_flip if spec.augment == "pad_crop" else _resized_crop_flip
        ds = _with_seeds(ds.shuffle(_SHUFFLE_BUFFER, seed=seed), seed).map(
            lambda xy, s: (augment(xy[0], s, image_size), xy[1]), _AUTOTUNE)
    else:
        prepare = _to_float if spec.augment == "pad_crop" else _center_crop
        ds = ds.map(lambda x, y: (prepare(x, image_size), y), _AUTOTUNE)
    return _batch(ds, batch_size, training)


def text_dataset(
    name: str, split: str, *, batch_size: int, seq_len: int = 256, vocab_size: int = 20_000,
    data_dir: str | None = None, training: bool, seed: int = 0,
    num_examples_synthetic: int = 2048,
) -> tf.data.Dataset:
    """Batches of `(token_ids, label)` for text classification.

    `imdb_reviews` is tokenized by `hash_tokenize`, then cached. Training pipelines are
    shuffled from `seed` and drop the last partial batch.

    Args:
        name: One of `TEXT_DATASETS`.
        split: A TFDS split; `"train"` or `"test"` for `synthetic_text`.
        batch_size: Examples per batch.
        seq_len: Tokens per example.
        vocab_size: Number of ids, 0 (padding) included.
        data_dir: TFDS data directory; `None` for TFDS' default.
        training: Whether to shuffle and drop the last partial batch.
        seed: Seed of the shuffle and the synthetic examples.
        num_examples_synthetic: Size of a `synthetic_text` split.

    Returns:
        A `tf.data.Dataset` of int32 `(batch, seq_len)` ids and int32 labels; e.g.
        `text_dataset("synthetic_text", "train", batch_size=8, training=True)`.

    Raises:
        ValueError: For an unknown name or split, or a bad size.
        FileNotFoundError: When the TFDS dataset is not prepared in `data_dir`.
    """
    spec = _SPECS[validate_dataset_name(name, kind="text")]
    _check_int("batch_size", batch_size)
    _check_int("seq_len", seq_len)
    _check_int("vocab_size", vocab_size, 2)
    if spec.tfds_name is None:
        x, y = synthetic_text(num_examples_synthetic, seq_len, vocab_size, spec.num_classes,
                              _synthetic_seed(spec, split, seed))
        ds = tf.data.Dataset.from_tensor_slices((x, y))
    else:
        ds = _load_tfds(spec, split, data_dir, training, seed).map(
            lambda x, y: (hash_tokenize(x, seq_len=seq_len, vocab_size=vocab_size), y),
            _AUTOTUNE).cache()
    if training:
        ds = ds.shuffle(_SHUFFLE_BUFFER, seed=seed)
    return _batch(ds, batch_size, training)
