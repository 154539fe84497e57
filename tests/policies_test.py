"""Tests for tfmp.policies."""

from unittest import mock

import keras
from absl.testing import parameterized

import tfmp
from tests.base import TestCase
from tfmp import policies


class PoliciesTest(TestCase):
    @parameterized.named_parameters(
        ("mixed_float16", "mixed_float16", "float16", "float32"),
        ("mixed_bfloat16", "mixed_bfloat16", "bfloat16", "float32"),
        ("float32", "float32", "float32", "float32"),
    )
    def test_set_global_policy(self, name, compute, variable):
        self.assertEqual(tfmp.set_global_policy(name), name)
        layer = keras.layers.Dense(2)
        self.assertEqual((layer.compute_dtype, layer.variable_dtype), (compute, variable))

    def test_unknown_name_lists_valid_ones(self):
        with self.assertRaisesRegex(
            ValueError,
            "Unknown `policy`: 'float16_mixed'. Expected one of: mixed_float16, mixed_bfloat16, "
            "float32, auto.",
        ):
            tfmp.set_global_policy("float16_mixed")
        self.assertEqual(keras.config.dtype_policy().name, "float32")

    def test_scope_restores_previous_policy(self):
        tfmp.set_global_policy("mixed_bfloat16")
        with tfmp.policy_scope("mixed_float16") as name:
            self.assertEqual(name, "mixed_float16")
            self.assertEqual(keras.layers.Dense(1).compute_dtype, "float16")
        self.assertEqual(keras.config.dtype_policy().name, "mixed_bfloat16")

    def test_scope_restores_on_exception(self):
        with self.assertRaisesRegex(RuntimeError, "boom"):
            with tfmp.policy_scope("mixed_float16"):
                raise RuntimeError("boom")
        self.assertEqual(keras.config.dtype_policy().name, "float32")

    @parameterized.named_parameters(
        ("volta_gpu", [(7, 0)], False, [], "mixed_float16", "compute capability 7.0"),
        ("pascal_gpu", [(6, 1)], False, ["avx512_bf16"], "float32", "needs 7.0"),
        ("tpu", [], True, [], "mixed_bfloat16", "TPU"),
        ("bf16_cpu", [], False, ["amx_bf16"], "mixed_bfloat16", "amx_bf16"),
        ("plain_cpu", [], False, [], "float32", "no GPU"),
    )
    def test_auto(self, gpus, tpu, cpu_flags, expected, reason):
        with mock.patch.object(policies, "gpu_capabilities", return_value=gpus), \
                mock.patch.object(policies, "_has_tpu", return_value=tpu), \
                mock.patch.object(policies, "_cpu_bf16_flags", return_value=cpu_flags), \
                self.assertLogs("tfmp", "INFO") as logs:
            self.assertEqual(tfmp.set_global_policy("auto"), expected)
        self.assertEqual(keras.config.dtype_policy().name, expected)
        self.assertEqual(len(logs.output), 1)
        self.assertIn(reason, logs.output[0])

    def test_cpu_flags_are_read_from_cpuinfo(self):
        path = f"{self.tmp_dir()}/cpuinfo"
        with open(path, "w") as f:
            f.write("processor : 0\nflags : fpu sse2 avx512f avx512_bf16\n")
        self.assertEqual(policies._cpu_bf16_flags(path), ["avx512_bf16"])
        self.assertEqual(policies._cpu_bf16_flags(f"{path}.missing"), [])
