#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels that benchmarks/gpu_evidence.sh installs on the GPU machine
# (which reaches no registry). Python 3.12 / x86-64, as on the lent H100/H200 image.
#
#   bash benchmarks/fetch_wheels.sh          # -> wheels/*.whl (keep wheels/ git-ignored: see README.md)
#
# The GPU image already has torch, triton, transformers, accelerate, pandas, pyarrow, xxhash, fsspec,
# huggingface-hub, psutil; TRL's import chain also needs datasets, whose dill and multiprocess are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEST=${DEST:-wheels}
WHEELS=(
    trl==1.16.0
    liger-kernel==0.8.5
    cut-cross-entropy==25.1.1
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
)
mkdir -p "$DEST"
for spec in "${WHEELS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
        -d "$DEST" "$spec"
done
ls -la "$DEST"
du -sh "$DEST"
