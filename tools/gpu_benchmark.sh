#!/usr/bin/env bash
# The mixed precision comparison on a GPU machine without TensorFlow or Keras, under JAX.
#
#   tools/build_wheelhouse.sh               # first, where there is network: wheelhouse/
#   tools/gpu_benchmark.sh                  # there, from the repository root, wheelhouse/ carried
#   TFMP_BENCH_QUICK=1 tools/gpu_benchmark.sh    # a CPU dry run with tiny sizes
#
# Installs keras (and namex, optree, packaging, typing-extensions where missing) from
# wheelhouse/ into a temporary directory, no index, no dependencies (the machine's JAX and
# numpy are used), then runs
# `python -m tools.benchmark` with KERAS_BACKEND=jax on mlp (4096 x 8, batch 8192), transformer
# (BERT-base, sequence 512, batch 32) and resnet50 (224x224, batch 256): float32 (TF32 and
# strict) vs mixed_float16 vs mixed_bfloat16, then the loss-scaling overhead (plain Adam vs
# Keras' and tfmp's LossScaleOptimizer). Estimated at 5-7 minutes on one H200; a model still
# running when the budget is spent is stopped and the ones after it are skipped.
#
# Writes into $TFMP_BENCHMARK_OUT (default: $OUT if set, else ./benchmark_out): per model
# MODEL.txt (the tables), MODEL.json and MODEL.log (stderr); summary.txt (every table, then
# the targets: mixed >= 2x TF32 on resnet50 and transformer, activation memory <= 0.55x,
# tfmp's optimizer within 1.03x of the plain one); environment.txt.
#
# Env: TFMP_BENCH_QUICK=1 (tiny sizes), TFMP_BENCH_MAX_BATCH=1 (also search the largest batch:
# one compilation per size tried, many minutes), TFMP_BENCH_BUDGET_S (default 450; quick 1800),
# TFMP_BENCH_MODELS (default "mlp transformer resnet50"), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."

die() { echo "gpu_benchmark: error: $*" >&2; exit 1; }

PY=${PYTHON:-python3}
shopt -s nullglob
wheels=(wheelhouse/keras-*.whl)
[[ ${#wheels[@]} -gt 0 ]] || die "no wheelhouse/keras-*.whl: run tools/build_wheelhouse.sh \
where there is network and carry wheelhouse/ (it is gitignored)"
out=${TFMP_BENCHMARK_OUT:-${OUT:-./benchmark_out}}
mkdir -p "$out" || die "cannot create the output directory $out"

scratch=$(mktemp -d) || die "mktemp failed"
trap 'rm -rf "$scratch"' EXIT
packages=(keras)
for module in namex optree packaging typing_extensions; do
  "$PY" -c "import $module" 2>/dev/null || packages+=("${module//_/-}")
done
"$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
  --find-links wheelhouse --target "$scratch/site" "${packages[@]}" >"$scratch/pip.log" 2>&1 \
  || die "pip could not install ${packages[*]} from wheelhouse/: $(tail -1 "$scratch/pip.log")"

export PYTHONPATH="$PWD:$scratch/site${PYTHONPATH:+:$PYTHONPATH}"
export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
if ! "$PY" - >"$out/environment.txt" 2>"$scratch/import.log" <<'EOF'
import importlib.util, platform, sys
import jax, keras, numpy, tfmp
assert keras.backend.backend() == "jax", keras.backend.backend()
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
print(f"python {platform.python_version()}, jax {jax.__version__}, keras {keras.__version__}, "
      f"numpy {numpy.__version__}, tensorflow installed: "
      f"{importlib.util.find_spec('tensorflow') is not None}")
print("devices:", ", ".join(f"{d.platform}:{d.device_kind}" for d in jax.devices()))
EOF
then
  die "keras/tfmp do not import under JAX: $(tail -1 "$scratch/import.log")"
fi
cat "$out/environment.txt"

if [[ ${TFMP_BENCH_QUICK:-0} == 1 ]]; then
  common=(--steps=1 --repeats=2 --warmup=1)
  declare -A sizes=(
    [mlp]="--hidden=64 --num_layers=2 --batch_size=16"
    [transformer]="--hidden=32 --num_heads=2 --seq_len=16 --num_layers=1 --batch_size=4"
    [resnet50]="--image_size=32 --batch_size=2")
else
  common=(--repeats=5 --warmup=3)
  declare -A sizes=([mlp]="--steps=10" [transformer]="--steps=8" [resnet50]="--steps=8")
fi
[[ ${TFMP_BENCH_MAX_BATCH:-0} == 1 ]] || common+=(--nomax_batch_search)

quick_budget=$([[ ${TFMP_BENCH_QUICK:-0} == 1 ]] && echo 1800 || echo 450)
budget=${TFMP_BENCH_BUDGET_S:-$quick_budget}
start=$SECONDS
status=0
: >"$out/summary.txt"
for model in ${TFMP_BENCH_MODELS:-mlp transformer resnet50}; do
  left=$(( budget - (SECONDS - start) ))
  if (( left < 30 )); then
    echo "$model: skipped, the ${budget} s budget is spent" | tee -a "$out/summary.txt"
    status=1
    continue
  fi
  # shellcheck disable=SC2086  # the sizes are separate flags
  timeout --kill-after=15 "$left" "$PY" -m tools.benchmark --model="$model" ${sizes[$model]} \
    "${common[@]}" --noprogress --json="$out/$model.json" >"$out/$model.txt" 2>"$out/$model.log"
  rc=$?
  if (( rc == 0 )); then
    echo "$model: done in $(( SECONDS - start )) s" >&2
    { cat "$out/$model.txt"; echo; } >>"$out/summary.txt"
  else
    why=$([[ $rc == 124 || $rc == 137 ]] && echo "stopped at the budget" || echo "failed")
    echo "$model: $why (exit $rc): $(grep '^error:' "$out/$model.log" | tail -1)" \
      | tee -a "$out/summary.txt"
    status=1
  fi
done

"$PY" - "$out" >>"$out/summary.txt" <<'EOF'
import json, os, sys
out = sys.argv[1]
print("Targets (GPU): mixed >= 2x TF32 on resnet50/transformer, activation memory <= 0.55x, "
      "tfmp's optimizer <= 1.03x the plain one")
for model in ("mlp", "transformer", "resnet50"):
    path = os.path.join(out, f"{model}.json")
    if not os.path.exists(path):
        continue
    with open(path) as f:
        r = json.load(f)
    rows, base = r["policies"], r["baseline"]
    parts = [f"{model} on {r['device']} (baseline {base!r}):"]
    for p in ("mixed_float16", "mixed_bfloat16"):
        if p in rows:
            parts.append(f"{p} {rows[p]['speedup']:.2f}x speed, "
                         f"{rows[p]['activation_memory_ratio']:.2f}x activations")
    if "float32 (highest)" in rows:
        parts.append(f"strict float32 {rows['float32 (highest)']['speedup']:.2f}x")
    if r["optimizer_overhead"]:
        o = r["optimizer_overhead"]["optimizers"]
        parts.append(f"tfmp/plain {o['tfmp']['step_time_ratio']:.3f}x, "
                     f"keras/plain {o['keras']['step_time_ratio']:.3f}x")
    print(" ".join(parts[:1]) + " " + "; ".join(parts[1:]))
EOF
cat "$out/summary.txt"
echo "gpu_benchmark: wrote $out (in $(( SECONDS - start )) s)"
exit $status
