"""Tests for tfmp/benchmark_models.py: the benchmark's models and their synthetic batches."""

import tfmp
from tests.base import TestCase
from tfmp import benchmark_models


class BenchmarkModelsTest(TestCase):

    def test_resnet50_builds_small_with_a_float32_head(self):
        # Training it is keras.applications' ResNet50 on the resnet_mini code path; its first
        # traced step alone takes ~30 s on a 2-core CPU, so the GPU script's quick mode runs it.
        config, batch_size = benchmark_models.resolve("resnet50", image_size=32)
        self.assertEqual((config.sizes(), batch_size), ({"image_size": 32}, 256))
        f32 = benchmark_models.build(config, "float32")
        f16 = benchmark_models.build(config, "mixed_float16")
        self.assertEqual(f32.count_params(), 23_587_712 + 2048 * 1000 + 1000)
        self.assertEqual(f16.outputs[0].dtype, "float32")  # The loss is float32.
        ratio = (tfmp.audit.activation_bytes_per_example(f16)
                 / tfmp.audit.activation_bytes_per_example(f32))
        self.assertLess(ratio, 0.55)
        x, y = benchmark_models.synthetic_batch(f16, 2, seed=0)
        self.assertEqual((x.shape, x.dtype, y.shape), ((2, 32, 32, 3), "float32", (2,)))
        self.assertTrue(((0 <= y) & (y < 1000)).all())
