"""Tests for tfmp.data: synthetic data, and the TFDS pipelines through tfds.testing.mock_data."""

import os
import re
import shutil
import tempfile
from unittest import mock

import keras
import numpy as np
import tensorflow_datasets as tfds
from absl.testing import parameterized

from tests.base import TestCase
from tfmp import data

_MOCK_EXAMPLES = 10


def _first(ds):
    x, y = next(iter(ds))
    return x.numpy(), y.numpy()


def _tempdir(test):
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def _all(ds):
    batches = list(ds.as_numpy_iterator())
    return [x for x, _ in batches], [y for _, y in batches]


class ValidationTest(TestCase):
    @parameterized.named_parameters(
        ("unknown", data.image_dataset, "mnist",
         r"Unknown `dataset`: 'mnist'\. Expected an image dataset, one of: "
         r"synthetic, cifar10, imagenet2012\."),
        ("text_as_image", data.image_dataset, "imdb_reviews",
         r"'imdb_reviews'\. Expected an image dataset, one of: synthetic, cifar10, imagenet2012"),
        ("image_as_text", data.text_dataset, "cifar10",
         r"'cifar10'\. Expected a text dataset, one of: synthetic_text, imdb_reviews\."),
    )
    def test_builder_rejects_wrong_dataset(self, builder, name, message):
        with self.assertRaisesRegex(ValueError, message):
            builder(name, "train", batch_size=4, training=True)

    def test_validate_dataset_name_lists_all_names(self):
        self.assertEqual(data.validate_dataset_name("imdb_reviews"), "imdb_reviews")
        with self.assertRaisesRegex(
            ValueError, r"Unknown `--data`: 'cifar100'\. Expected a dataset, one of: "
            r"synthetic, cifar10, imagenet2012, synthetic_text, imdb_reviews\."
        ):
            data.validate_dataset_name("cifar100", argument="--data")

    @parameterized.named_parameters(
        ("batch_size", dict(batch_size=0),
         r"`batch_size` must be an integer >= 1. Received: batch_size=0$"),
        ("image_size", dict(batch_size=4, image_size=-3),
         r"`image_size` must be an integer >= 1. Received: image_size=-3$"),
        ("float_batch", dict(batch_size=2.5), r"`batch_size` must be .*Received: batch_size=2\.5$"),
        ("split", dict(batch_size=4, split="validation"),
         r"Unknown `split`: 'validation'\. Expected one of: train, test\."),
    )
    def test_image_dataset_rejects_bad_arguments(self, kwargs, message):
        kwargs = {"split": "train", **kwargs}
        with self.assertRaisesRegex(ValueError, message):
            data.image_dataset("synthetic", training=True, **kwargs)

    def test_synthetic_text_needs_room_for_markers(self):
        with self.assertRaisesRegex(
            ValueError, r"`vocab_size` must be an integer >= 34. Received: vocab_size=20$"
        ):
            data.synthetic_text(8, vocab_size=20, num_classes=4)


class SyntheticTest(TestCase):
    def test_synthetic_images_shapes_range_and_seeds(self):
        x, y = data.synthetic_images(64, image_size=8, num_classes=5, seed=3)
        self.assertEqual((x.shape, x.dtype, y.shape, y.dtype),
                         ((64, 8, 8, 3), np.float32, (64,), np.int32))
        self.assertGreaterEqual(x.min(), 0.0)
        self.assertLessEqual(x.max(), 1.0)
        self.assertEqual(set(y.tolist()), set(range(5)))
        again, _ = data.synthetic_images(64, image_size=8, num_classes=5, seed=3)
        other, _ = data.synthetic_images(64, image_size=8, num_classes=5, seed=4)
        np.testing.assert_array_equal(x, again)
        self.assertFalse(np.array_equal(x, other))

    def test_synthetic_text_label_is_a_function_of_the_tokens(self):
        x, y = data.synthetic_text(400, seq_len=16, vocab_size=100, num_classes=3, seed=1)
        self.assertEqual((x.shape, x.dtype, y.dtype), ((400, 16), np.int32, np.int32))
        self.assertGreaterEqual(x.min(), 1)  # 0 is kept for padding.
        self.assertLess(x.max(), 100)
        # Tokens seen with a single label only are that label's markers; every example
        # holds markers of its own label and none of another.
        seen_with = {}
        for tokens, label in zip(x, y, strict=True):
            for t in set(tokens.tolist()):
                seen_with.setdefault(t, set()).add(int(label))
        owner = {t: labels.pop() for t, labels in seen_with.items() if len(labels) == 1}
        for tokens, label in zip(x, y, strict=True):
            owners = {owner[t] for t in tokens.tolist() if t in owner}
            self.assertEqual(owners, {int(label)})

    def test_synthetic_images_are_learnable_through_the_pipelines(self):
        kwargs = dict(image_size=16, seed=0, num_examples_synthetic=512)
        train = data.image_dataset("synthetic", "train", batch_size=32, training=True, **kwargs)
        test = data.image_dataset("synthetic", "test", batch_size=128, training=False, **kwargs)
        info = data.dataset_info("synthetic", image_size=16)
        model = keras.Sequential([
            keras.Input(info.input_shape),
            keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(info.num_classes),
        ])
        model.compile(keras.optimizers.Adam(1e-2),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        model.fit(train, epochs=2, verbose=0)
        _, accuracy = model.evaluate(test, verbose=0)
        self.assertGreater(accuracy, 2.0 / info.num_classes)  # Held-out examples, 2x chance.

    def test_synthetic_text_is_learnable(self):
        num_classes = 4
        x, y = data.synthetic_text(512, seq_len=32, vocab_size=200, num_classes=num_classes)
        x_test, y_test = data.synthetic_text(
            256, seq_len=32, vocab_size=200, num_classes=num_classes, seed=1)
        model = keras.Sequential([
            keras.Input((32,), dtype="int32"),
            keras.layers.Embedding(200, 16),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(num_classes),
        ])
        model.compile(keras.optimizers.Adam(1e-2),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        model.fit(x, y, batch_size=32, epochs=2, verbose=0)
        _, accuracy = model.evaluate(x_test, y_test, verbose=0)
        self.assertGreater(accuracy, 2.0 / num_classes)

    def test_synthetic_text_pipeline_splits_differ_and_match_info(self):
        kwargs = dict(batch_size=8, seq_len=24, vocab_size=300, num_examples_synthetic=20)
        train_x, train_y = _all(data.text_dataset("synthetic_text", "train", training=False,
                                                  **kwargs))
        test_x, _ = _all(data.text_dataset("synthetic_text", "test", training=False, **kwargs))
        info = data.dataset_info("synthetic_text", seq_len=24)
        self.assertEqual(train_x[0].shape[1:], info.input_shape)
        self.assertEqual(train_x[0].dtype, np.int32)
        self.assertEqual([len(b) for b in train_x], [8, 8, 4])  # Eval keeps the remainder.
        self.assertLess(np.concatenate(train_y).max(), info.num_classes)
        self.assertFalse(np.array_equal(train_x[0], test_x[0]))


class HashTokenizeTest(TestCase):
    def test_words_are_case_and_punctuation_insensitive(self):
        ids = data.hash_tokenize("Great movie<br />GREAT, film!", seq_len=6, vocab_size=50)
        ids = ids.numpy()
        self.assertEqual(ids.dtype, np.int32)
        self.assertEqual(ids[0], ids[2])  # "Great" and "GREAT,".
        self.assertTrue(np.all((ids[:4] >= 1) & (ids[:4] < 50)), ids)
        np.testing.assert_array_equal(ids[4:], [0, 0])  # Padding.

    def test_batch_matches_scalars_and_truncates(self):
        texts = ["one two three four", "five"]
        batch = data.hash_tokenize(texts, seq_len=3, vocab_size=1000).numpy()
        self.assertEqual(batch.shape, (2, 3))
        for row, text in zip(batch, texts, strict=True):
            np.testing.assert_array_equal(
                row, data.hash_tokenize(text, seq_len=3, vocab_size=1000).numpy())
        self.assertEqual(batch[1, 1:].tolist(), [0, 0])


class TfdsPipelineTest(TestCase):
    """The real `tfds.load` code path, fed by TFDS' own mock data."""

    def setUp(self):
        super().setUp()
        self.data_dir = _tempdir(self)
        mocked = tfds.testing.mock_data(num_examples=_MOCK_EXAMPLES)
        mocked.__enter__()
        self.addCleanup(mocked.__exit__, None, None, None)

    def _raw(self, name, split="train"):
        ds = tfds.load(name, split=split, data_dir=self.data_dir, as_supervised=True)
        return [x for x, _ in ds.as_numpy_iterator()], [y for _, y in ds.as_numpy_iterator()]

    @parameterized.named_parameters(("native_size", 32), ("resized", 24))
    def test_cifar10_batches(self, image_size):
        kwargs = dict(batch_size=4, image_size=image_size, data_dir=self.data_dir)
        info = data.dataset_info("cifar10", image_size=image_size)
        for training, sizes in ((True, [4, 4]), (False, [4, 4, 2])):
            xs, ys = _all(data.image_dataset("cifar10", "train", training=training, **kwargs))
            self.assertEqual([len(x) for x in xs], sizes)  # drop_remainder only when training.
            for x, y in zip(xs, ys, strict=True):
                self.assertEqual((x.shape[1:], x.dtype, y.dtype),
                                 (info.input_shape, np.float32, np.int32))
                self.assertTrue(0.0 <= x.min() and x.max() <= 1.0)
                self.assertTrue(np.all((y >= 0) & (y < info.num_classes)), y)

    def test_cifar10_eval_is_in_order_and_scaled_to_unit_range(self):
        raw_x, raw_y = self._raw("cifar10", "test")
        xs, ys = _all(data.image_dataset("cifar10", "test", batch_size=4, image_size=32,
                                         data_dir=self.data_dir, training=False))
        self.assertAllClose(np.concatenate(xs), np.stack(raw_x) / 255.0, atol=1e-6)
        np.testing.assert_array_equal(np.concatenate(ys), raw_y)

    def test_cifar10_training_is_shuffled_deterministically(self):
        def build(seed):
            return data.image_dataset("cifar10", "train", batch_size=4, image_size=32,
                                      data_dir=self.data_dir, training=True, seed=seed)

        x1, y1 = _first(build(7))
        x2, y2 = _first(build(7))
        x3, _ = _first(build(8))
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
        self.assertFalse(np.array_equal(x1, x3))
        ds = build(7)  # A second pass over one dataset: new shuffle, new crops.
        self.assertFalse(np.array_equal(_first(ds)[0], _first(ds)[0]))
        raw_x, _ = self._raw("cifar10")
        unchanged = [any(np.allclose(x, r / 255.0) for r in raw_x) for x in x1]
        self.assertLess(sum(unchanged), len(x1))  # Cropped and flipped.

    def test_imagenet2012_crops_variable_sized_jpegs(self):
        info = data.dataset_info("imagenet2012", image_size=24)
        for training in (True, False):
            xs, ys = _all(data.image_dataset("imagenet2012", "train", batch_size=4,
                                             image_size=24, data_dir=self.data_dir,
                                             training=training))
            self.assertEqual(len(xs), 2 if training else 3)
            for x, y in zip(xs, ys, strict=True):
                self.assertEqual((x.shape[1:], x.dtype, y.dtype),
                                 (info.input_shape, np.float32, np.int32))
                self.assertTrue(0.0 <= x.min() and x.max() <= 1.0)
                self.assertTrue(np.all((y >= 0) & (y < info.num_classes)), y)

    def test_imdb_reviews_batches_are_hashed_tokens(self):
        kwargs = dict(batch_size=4, seq_len=12, vocab_size=64, data_dir=self.data_dir)
        raw_text, raw_y = self._raw("imdb_reviews", "test")
        xs, ys = _all(data.text_dataset("imdb_reviews", "test", training=False, **kwargs))
        self.assertEqual([x.shape for x in xs], [(4, 12), (4, 12), (2, 12)])
        self.assertEqual((xs[0].dtype, ys[0].dtype), (np.int32, np.int32))
        expected = data.hash_tokenize(raw_text, seq_len=12, vocab_size=64).numpy()
        np.testing.assert_array_equal(np.concatenate(xs), expected)
        np.testing.assert_array_equal(np.concatenate(ys), raw_y)
        self.assertTrue(set(np.concatenate(ys).tolist()) <= {0, 1})
        self.assertTrue(np.all((expected >= 0) & (expected < 64)))

    def test_imdb_reviews_training_is_shuffled_deterministically(self):
        def build(seed):
            return data.text_dataset("imdb_reviews", "train", batch_size=4, seq_len=12,
                                     vocab_size=64, data_dir=self.data_dir, training=True,
                                     seed=seed)

        x1, y1 = _first(build(3))
        x2, y2 = _first(build(3))
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
        self.assertEqual([len(x) for x in _all(build(3))[0]], [4, 4])
        self.assertFalse(np.array_equal(x1, _first(build(4))[0]))


class MissingDatasetTest(TestCase):
    @parameterized.named_parameters(
        ("cifar10", data.image_dataset, "cifar10", ""),
        ("imagenet2012", data.image_dataset, "imagenet2012",
         ", after downloading ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
         "(image-net.org) manually into {}/downloads/manual/"),
        ("imdb_reviews", data.text_dataset, "imdb_reviews", ""),
    )
    def test_says_how_to_prepare_without_downloading(self, builder, name, manual):
        empty = _tempdir(self)
        message = (f"Dataset '{name}' not found in data_dir={empty}; prepare it with: "
                   f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
                   f"data_dir='{empty}').download_and_prepare()\"" + manual.format(empty))
        no_download = mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare",
                                        side_effect=RuntimeError("tried to download"))
        with no_download, self.assertRaisesRegex(FileNotFoundError, f"^{re.escape(message)}$"):
            builder(name, "train", batch_size=4, data_dir=empty, training=True)
        self.assertNotIn("downloads", os.listdir(empty))


if __name__ == "__main__":
    from absl.testing import absltest

    absltest.main()
