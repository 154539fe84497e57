"""Side-by-side training benchmark: float32 vs mixed_float16 vs mixed_bfloat16, any backend.

KERAS_BACKEND=jax python -m tools.benchmark --model=resnet50 [--batch_size=256 --json=r.json]
python -m tools.benchmark --model=transformer --hidden=256 --num_heads=4 --seq_len=128
python -m tools.benchmark --model_file=model.keras --nooptimizer_overhead

Trains the same model (same initial weights, same synthetic batch; see
`tfmp.benchmark_models`: resnet50, transformer (BERT-base), mlp, ...) under each
policy with a compiled step (`--jit_compile`, XLA on both backends) and prints,
side by side: examples/second and step time (medians over the repeats, after
warm-up), peak memory, activation memory per example (`tfmp.audit.
activation_bytes_per_example`: what decides how much larger a batch fits), the
final loss, on a GPU the largest batch that trains (doubling from the batch
size until out of memory, then bisecting to ~3%, in a fresh process per
policy), and their ratios to the float32 baseline (for speed, the median of the
per-repeat ratios). Each policy trains in its own spawned process, so that the
peak memory is its own: the GPU allocator's peak (TensorFlow with memory growth;
JAX with `XLA_PYTHON_CLIENT_PREALLOCATE=false`, so the processes share a GPU),
else the process' peak resident set size. The processes take turns, `steps`
steps each, the order reversed every other repeat, so slow drifts of the machine
hit every policy alike. Under JAX, TensorFlow is never imported.

The float32 baseline is the frameworks' default, which on Ampere and later GPUs
rounds matmul and convolution inputs to TF32: that row, `float32 (tf32)`, is
what the ratios use (it is what a user switching to mixed precision leaves).
`float32 (highest)` is also timed on such GPUs (TF32 off: strict float32). A
CPU has no TF32: there the one row is `float32` (the `float32_mode` field says
which). A second table, the cost of loss scaling: the same model under
mixed_float16 with the plain Adam, Keras' `LossScaleOptimizer` and tfmp's, as
ratios of step time to the plain one.

Published anchors (NVIDIA DeepLearningExamples, one GPU, XLA on, the mixed
batch usually twice the TF32 one): EfficientNet-B0 on A100, TF32 1209 -> AMP
3454 img/s (2.85x; TensorFlow2/Classification/ConvNets/efficientnet_v1);
BERT-large SQuAD fine-tuning on A100, TF32 43.9 -> AMP 134.2 seq/s (3.06x;
TensorFlow2/LanguageModeling/BERT); ResNet-50 2.60x on A100 (over TF32) and
3.08x on V100 (over float32; TensorFlow/Classification/ConvNets/resnet50v1.5).
On H100/H200 the dense 16-bit tensor-core peak is 2x the TF32 one. Targets on a
GPU: mixed >= 2x the TF32 throughput on ResNet-50 and the Transformer, <= 0.55x
the activation memory, tfmp's optimizer within 1.03x of the plain one. Here every
row trains the same batch (a doubled mixed batch, as NVIDIA's, would favour
mixed), and each step is one `train_on_batch` call, Python dispatch included.
`tools/gpu_benchmark.sh` runs the three models on a GPU machine under JAX.

Measure rather than assume: float16 is not always faster. CPUs without float16
arithmetic are usually slower with it, and on GPUs some kernels are too:
tensorflow/tensorflow#41715 reports a depthwise-convolution model at 120 ms/step
in float32 and 2000 ms/step under mixed precision (its backward pass).

A bad flag or argument prints one `error:` line on stderr and exits with status 2, before
anything runs; a failure during the benchmark, one `error:` line and status 1 (`tfmp.cli.run`).
"""

from __future__ import annotations

import json
import os

from absl import flags

# Read once, when TensorFlow loads: before `import tfmp` (which loads Keras, and so TensorFlow
# on its backend) in `_define_flags`; tfmp.benchmark_runner sets it only after that import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FLAGS = flags.FLAGS
# `tfmp.benchmark.benchmark`'s arguments, each from the flag of its name.
_ARGUMENTS = ("model", "model_file", "policies", "batch_size", "steps", "repeats", "warmup",
              "image_size", "hidden", "num_heads", "seq_len", "ff_dim", "num_layers",
              "jit_compile", "strict_float32", "optimizer_overhead", "isolate",
              "max_batch_search", "max_batch_limit", "progress")


def _define_flags() -> None:
    """Defines the tool's flags, only when it runs as a program.

    Importing the module (tests, spawned workers) then registers no flag that could clash with
    another tool's or recipe's flags in the same process.
    """
    from tfmp import benchmark

    flags.DEFINE_string(
        "model", "resnet_mini", "Model on synthetic data: resnet50, transformer (BERT-base "
        "encoder), mlp, resnet_mini, mobilenet_v2 or efficientnet_b0 (tfmp.benchmark_models).")
    flags.DEFINE_string(
        "model_file", None, "A `.keras` model (loaded with safe_mode=True) instead of --model; "
        "converted with tfmp.convert.apply_policy and trained on random inputs.")
    flags.DEFINE_list("policies", list(benchmark.POLICIES), "Policies to compare (float32 first).")
    flags.DEFINE_integer("batch_size", None, "Examples per step (default: the model's).")
    flags.DEFINE_integer("steps", 10, "Training steps per measurement.")
    flags.DEFINE_integer("repeats", 5, "Interleaved measurements (medians are reported).")
    flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation, allocation).")
    for name, help_ in (("image_size", "Image side (default 224; resnet_mini 32)."),
                        ("hidden", "Width of transformer (768) or mlp (4096)."),
                        ("num_heads", "Attention heads of transformer (12)."),
                        ("seq_len", "Tokens per transformer example (512)."),
                        ("ff_dim", "Feed-forward width of transformer (4 * hidden)."),
                        ("num_layers", "Blocks of transformer (12) or layers of mlp (8).")):
        flags.DEFINE_integer(name, None, help_)
    flags.DEFINE_bool("jit_compile", True, "XLA-compile the train step.")
    flags.DEFINE_bool("strict_float32", True,
                      "On a GPU with TF32, also time float32 with TF32 off.")
    flags.DEFINE_bool("optimizer_overhead", True, "Also time plain Adam vs Keras' and tfmp's "
                      "LossScaleOptimizer under mixed_float16.")
    flags.DEFINE_bool("isolate", True, "One process per row (needed for per-row peak memory).")
    flags.DEFINE_bool("max_batch_search", True, "On a GPU, search the largest batch.")
    flags.DEFINE_integer("max_batch_limit", 65536, "Largest batch tried.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.DEFINE_string("json", None, "Also write the results to this JSON file.")


def main(argv: list[str]) -> None:
    """Runs `tfmp.benchmark.benchmark` with the flags' values and prints its tables."""
    from tfmp import benchmark, cli

    cli.check_no_arguments(argv)
    if FLAGS.json:
        cli.check_output_file(FLAGS.json, argument="json")  # now, not after the benchmark
    results = benchmark.benchmark(**{name: FLAGS[name].value for name in _ARGUMENTS})
    print(benchmark.format_table(results), flush=True)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    _define_flags()
    from tfmp import cli

    cli.run(main)
