"""Tests for tfmp.placement: float32 at every depth, by rule and by behaviour, and as a map."""

import importlib.util
import os
import unittest

import keras
import numpy as np
from absl.testing import parameterized

import tfmp
from tests.base import BACKEND, TestCase
from tfmp import placement


@keras.saving.register_keras_serializable(package="tfmp_test")
class Rescale(keras.layers.Layer):
    """A normalisation in all but name (an epsilon and a `scale` weight), as libraries
    write their own (keras-hub's RMSNormalization is not a Keras subclass)."""

    def __init__(self, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")

    def call(self, x):
        x = keras.ops.cast(x, self.compute_dtype)
        mean_square = keras.ops.mean(keras.ops.square(x), axis=-1, keepdims=True)
        return x * keras.ops.rsqrt(mean_square + self.epsilon) * self.scale

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="tfmp_test")
class PostNormBlock(keras.layers.Layer):
    """A post-norm block whose sub-layers are made in `build()` from its own policy,
    as keras-hub's TransformerEncoder makes them: its config records none of them."""

    def get_config(self):  # no sub-layer's policy recorded, like keras-hub's blocks
        return {"name": self.name, "trainable": self.trainable,
                "dtype": keras.dtype_policies.serialize(self.dtype_policy)}

    def build(self, input_shape):
        units = input_shape[-1]
        policy = self.dtype_policy
        self.dense = keras.layers.Dense(units, dtype=policy, name="dense")
        self.norm = keras.layers.LayerNormalization(dtype=policy, name="norm")
        self.ffn = keras.layers.Dense(units, dtype=policy, name="ffn")
        self.rescale = Rescale(dtype=policy, name="rescale")
        self.softmax = keras.layers.Softmax(dtype=policy, name="softmax")
        for layer in (self.dense, self.norm, self.ffn, self.rescale, self.softmax):
            layer.build(input_shape)

    def call(self, x):
        x = self.norm(x + self.dense(x))
        x = x + self.ffn(x)  # the normalisation's output is the residual: dtypes must agree
        # The ends cast, as careful libraries do; the residual above does not.
        return (keras.ops.cast(self.rescale(x), x.dtype)
                * keras.ops.cast(self.softmax(x), x.dtype))


def _model(dtype="mixed_float16"):
    inputs = keras.Input((8,))
    h = keras.layers.Dense(8, dtype=dtype, name="embed")(inputs)
    h = PostNormBlock(dtype=dtype, name="block")(h)
    outputs = tfmp.layers.OutputHead(3, name="head")(h)
    return keras.Model(inputs, outputs)


def _nested_policies(model):
    return {layer.path: layer.dtype_policy.name for layer, _ in placement.walk(model)
            if layer.path and "/" in layer.path}


_X = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
_Y = np.random.default_rng(1).integers(0, 3, 16)


class PlacementTest(TestCase):
    def test_placement_at_every_depth_by_class_and_by_behaviour(self):
        found = placement.float32_placement(_model())
        self.assertEqual(sorted(found), ["block/norm", "block/rescale", "block/softmax",
                                         "head"])
        self.assertEqual(found["block/norm"], "a LayerNormalization")
        self.assertEqual(found["block/rescale"],
                         "a normalisation (an epsilon and a scale weight)")
        without = placement.float32_placement(_model(),
                                              placement.Float32Rules(by_behaviour=False))
        self.assertNotIn("block/rescale", without)

    def test_stock_apply_policy_left_nested_layers_in_float16(self):
        model = _model()
        flat = tfmp.apply_policy(model, "mixed_float16", nested=False)
        self.assertEqual(set(_nested_policies(flat).values()), {"mixed_float16"})

    def test_apply_policy_places_float32_inside_the_block_and_trains(self):
        with tfmp.policy_scope("float32"):
            reference = _model("float32")
        model = _model()
        model.set_weights(reference.get_weights())
        mixed = tfmp.apply_policy(model, "mixed_float16")
        self.assertEqual(_nested_policies(mixed), {
            "block/dense": "mixed_float16", "block/ffn": "mixed_float16",
            "block/norm": "float32", "block/rescale": "float32", "block/softmax": "float32"})
        self.assertEqual(mixed.get_layer("block").compute_dtype, "float16")
        predictions = keras.ops.convert_to_numpy(mixed(_X))
        np.testing.assert_allclose(predictions, keras.ops.convert_to_numpy(reference(_X)),
                                   atol=5e-3)
        mixed.compile(optimizer=tfmp.LossScaleOptimizer(keras.optimizers.Adam(1e-2)),
                      loss=tfmp.losses.SparseCategoricalCrossentropy())
        history = mixed.fit(_X, _Y, batch_size=4, epochs=1, verbose=0)
        self.assertTrue(np.isfinite(history.history["loss"][-1]))
        self.assertTrue(all(np.isfinite(keras.ops.convert_to_numpy(w)).all()
                            for w in mixed.weights))

    @unittest.skipUnless(BACKEND == "tensorflow", "TensorFlow adds float16 to float32 only "
                         "with a cast; JAX and PyTorch promote")
    def test_float32_without_the_cast_back_breaks_a_post_norm_block(self):
        model = _model()
        model.get_layer("block").norm.dtype_policy = "float32"
        with self.assertRaisesRegex(Exception, r"(half|float16).*(float|float32)|"
                                    r"(float|float32).*(half|float16)"):
            model(_X)

    def test_rules_by_name_and_path(self):
        model = _model()
        rules = placement.Float32Rules(layers=(), names=("ffn",), paths=("block/dense",),
                                       by_behaviour=False)
        self.assertEqual(placement.float32_placement(model, rules),
                         {"block/ffn": "name matches 'ffn'",
                          "block/dense": "path matches 'block/dense'"})
        mixed = tfmp.apply_policy(model, "mixed_float16", float32_layers=(),
                                  float32_names=("ffn",), float32_paths=("block/dense",),
                                  by_behaviour=False)
        self.assertEqual(_nested_policies(mixed)["block/ffn"], "float32")
        self.assertEqual(_nested_policies(mixed)["block/dense"], "float32")
        self.assertEqual(_nested_policies(mixed)["block/norm"], "mixed_float16")

    @parameterized.named_parameters(
        ("names_string", dict(names="ffn"), r"^`names` must be a tuple of non-empty fnmatch"),
        ("paths_empty", dict(paths=("",)), r"^`paths` must be a tuple of non-empty fnmatch"),
        ("layers_entry", dict(layers=(3,)), r"^Every entry of `layers` must be a Keras layer"))
    def test_bad_rules(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            placement.Float32Rules(**kwargs)

    def test_policy_map_builds_and_reloads_with_the_placement(self):
        # The residual's normalisation stays in the policy: a map sets compute dtypes
        # only, so a float32 normalisation would meet a float16 residual (next test).
        rules = placement.Float32Rules(layers=(keras.layers.Softmax, Rescale),
                                       by_behaviour=False)
        policy_map = placement.policy_map(_model(), "mixed_float16", rules)
        self.assertEqual(sorted(path for path in policy_map if policy_map[path].name ==
                                "float32"), ["block/rescale", "block/softmax"])
        self.assertEqual(policy_map["block/dense"].name, "mixed_float16")  # the default
        keras.backend.clear_session()  # the same paths again
        model = _model(dtype=policy_map)
        block = model.get_layer("block")
        self.assertEqual((block.rescale.compute_dtype, block.softmax.compute_dtype,
                          block.dense.compute_dtype), ("float32", "float32", "float16"))
        self.assertTrue(np.isfinite(keras.ops.convert_to_numpy(model(_X))).all())
        path = os.path.join(self.tmp_dir(), "mapped.keras")
        model.save(path)
        block = keras.saving.load_model(path).get_layer("block")
        self.assertEqual((block.rescale.compute_dtype, block.dense.compute_dtype),
                         ("float32", "float16"))

    @unittest.skipUnless(BACKEND == "tensorflow", "JAX and PyTorch promote the addition")
    def test_policy_map_with_a_float32_residual_normalisation_fails_on_tensorflow(self):
        policy_map = placement.policy_map(_model(), "mixed_float16")
        self.assertEqual(policy_map["block/norm"].name, "float32")
        keras.backend.clear_session()
        with self.assertRaisesRegex(Exception, r"AddV2"):
            _model(dtype=policy_map)

    def test_a_layer_whose_config_does_not_rebuild_is_named_in_one_line(self):
        @keras.saving.register_keras_serializable(package="tfmp_test")
        class Broken(keras.layers.Layer):
            def __init__(self, width=4, **kwargs):
                super().__init__(**kwargs)
                self.width_ = width

            def call(self, x):
                return x

            def get_config(self):
                return {**super().get_config(), "wdith": self.width_}  # a typo

        model = keras.Sequential([keras.Input((4,)), Broken(name="broken"),
                                  keras.layers.Dense(2)])
        with self.assertRaisesRegex(ValueError, r"^Layer 'broken' \(.*Broken\) cannot be "
                                    r"rebuilt from its get_config\(\) \(TypeError: .*\), so "
                                    r"apply_policy\(\) cannot copy the model\."):
            tfmp.apply_policy(model, "mixed_float16")


_HAS_KERAS_HUB = importlib.util.find_spec("keras_hub") is not None
_TINY = dict(vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=16,
             intermediate_dim=32, max_sequence_length=16)


@unittest.skipUnless(_HAS_KERAS_HUB and BACKEND == "tensorflow",
                     "keras-hub (the test extra) on TensorFlow")
class KerasHubTest(TestCase):
    """keras-hub 0.32 backbones from their classes (tiny, random weights, no download)."""

    def _backbone(self, name):
        import keras_hub

        with tfmp.policy_scope("float32"):
            if name == "resnet":
                return keras_hub.models.ResNetBackbone(
                    input_conv_filters=[64], input_conv_kernel_sizes=[7],
                    stackwise_num_filters=[64, 64], stackwise_num_blocks=[1, 1],
                    stackwise_num_strides=[1, 2], block_type="basic_block",
                    image_shape=(32, 32, 3)), np.random.default_rng(0).random(
                        (2, 32, 32, 3)).astype("float32")
            cls = {"bert": keras_hub.models.BertBackbone,
                   "gpt2": keras_hub.models.GPT2Backbone}[name]
            tokens = np.random.default_rng(0).integers(1, 100, (2, 16)).astype("int32")
            inputs = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
            if name == "bert":
                inputs["segment_ids"] = np.zeros_like(tokens)
            return cls(**_TINY), inputs

    @parameterized.named_parameters(("bert", "bert"), ("gpt2", "gpt2"), ("resnet", "resnet"))
    def test_every_normalisation_at_every_depth_is_float32(self, name):
        reference, inputs = self._backbone(name)
        mixed = tfmp.apply_policy(reference, "mixed_float16")
        norms = [layer for layer, _ in placement.walk(mixed) if placement.behaviour(layer)
                 and "Norm" in type(layer).__name__]
        self.assertGreater(len(norms), 2)
        self.assertEqual({layer.compute_dtype for layer in norms}, {"float32"})
        others = {layer.compute_dtype for layer, _ in placement.walk(mixed)
                  if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense,
                                        keras.layers.Conv2D))}
        self.assertEqual(others - {"float32"}, {"float16"})  # the matmuls stay float16
        want = keras.tree.map_structure(keras.ops.convert_to_numpy, reference(inputs))
        got = keras.tree.map_structure(keras.ops.convert_to_numpy, mixed(inputs))
        for w, g in zip(keras.tree.flatten(want), keras.tree.flatten(got), strict=True):
            scale = float(np.abs(w).max()) or 1.0
            np.testing.assert_allclose(np.asarray(g, "float32") / scale, w / scale, atol=3e-2)
        # A few training steps through the converted backbone stay finite.
        features = keras.tree.flatten(mixed.output)[0]
        if len(features.shape) > 2:  # mean over the sequence or the image
            features = keras.ops.mean(features, axis=tuple(range(1, len(features.shape) - 1)))
        trainer = keras.Model(mixed.input, keras.layers.Dense(2, dtype="float32")(features))
        trainer.compile(optimizer=tfmp.LossScaleOptimizer(keras.optimizers.Adam(1e-3)),
                        loss=tfmp.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = trainer.fit(inputs, np.array([0, 1]), batch_size=2, epochs=3, verbose=0)
        self.assertTrue(np.isfinite(history.history["loss"]).all())
        self.assertTrue(all(np.isfinite(keras.ops.convert_to_numpy(w)).all()
                            for w in trainer.weights))

    def test_gpt2_built_from_a_policy_map_saves_and_reloads_it(self):
        import keras_hub

        with tfmp.policy_scope("float32"):
            probe = keras_hub.models.GPT2Backbone(**_TINY)
        policy_map = placement.policy_map(probe, "mixed_float16")
        keras.backend.clear_session()  # the same paths again
        model = keras_hub.models.GPT2Backbone(**_TINY, dtype=policy_map)
        norms = {layer.path: layer.compute_dtype for layer, _ in placement.walk(model)
                 if isinstance(layer, keras.layers.LayerNormalization)}
        self.assertEqual(len(norms), 5)
        self.assertEqual(set(norms.values()), {"float32"})
        path = os.path.join(self.tmp_dir(), "gpt2.keras")
        model.save(path)
        reloaded = keras.saving.load_model(path)
        self.assertEqual({layer.path: layer.compute_dtype for layer, _ in placement.walk(reloaded)
                          if isinstance(layer, keras.layers.LayerNormalization)}, norms)
        self.assertEqual({layer.compute_dtype for layer, _ in placement.walk(reloaded)
                          if isinstance(layer, keras.layers.EinsumDense)}, {"float16"})

    def test_llama_whose_config_does_not_rebuild_is_named_in_one_line(self):
        import keras_hub

        with tfmp.policy_scope("float32"):
            llama = keras_hub.models.LlamaBackbone(
                vocabulary_size=100, num_layers=1, num_query_heads=2, num_key_value_heads=1,
                hidden_dim=16, intermediate_dim=32)
        with self.assertRaisesRegex(ValueError, r"^Layer '.*' \(keras_hub\..*\) cannot be "
                                    r"rebuilt from its get_config\(\) \(AttributeError: "):
            tfmp.apply_policy(llama, "mixed_float16")

