#!/usr/bin/env bash
# Downloads into wheelhouse/ what tools/gpu_benchmark.sh installs, offline, on the GPU machine.
#
#   tools/build_wheelhouse.sh        # here, with network, from any directory
#
# That machine has Python 3.12 (x86-64), JAX with CUDA, numpy, h5py, ml-dtypes, rich, absl-py
# and matplotlib (hence packaging), but no TensorFlow, no Keras and no network. Keras 3.15.1
# requires absl-py, numpy, rich, namex, h5py, optree, ml-dtypes and packaging, and optree
# requires typing-extensions (PyTorch's too, so likely there): this brings keras (the version
# of this repository's venv, KERAS_VERSION to override), namex, optree, and packaging and
# typing-extensions (installed there only if missing), each as a cp312 manylinux x86-64 or
# pure wheel, without dependencies (`--no-deps`: nothing pulls jax or numpy again).
#
# Env: KERAS_VERSION (default 3.15.1), PYTHON_VERSIONS (default "3.12"; add the local
# version, e.g. "3.12 3.11", for a dry run with another Python), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

KERAS_VERSION=${KERAS_VERSION:-3.15.1}
PY=${PYTHON:-python3}
MAX_MIB=16  # The device run carries at most 64 MiB in all, with the working tree.

rm -rf wheelhouse
mkdir -p wheelhouse
for version in ${PYTHON_VERSIONS:-3.12}; do
  "$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
    --python-version "$version" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -d wheelhouse "keras==$KERAS_VERSION" namex optree packaging typing-extensions
done

ls -l wheelhouse
kib=$(du -sk wheelhouse | cut -f1)
if (( kib > MAX_MIB * 1024 )); then
  echo "build_wheelhouse: wheelhouse/ is ${kib} KiB, over ${MAX_MIB} MiB" >&2
  exit 1
fi
echo "wheelhouse/: $(ls wheelhouse | wc -l) wheels, ${kib} KiB ($(( (kib + 1023) / 1024 )) MiB)"
