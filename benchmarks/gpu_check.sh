#!/usr/bin/env bash
# Everything a session with a lent GPU runs, in one script (exact calls: benchmarks/README.md).
#
#   bash benchmarks/gpu_check.sh tests            # the whole test suite on CUDA (TRITON_INTERPRET unset)
#   bash benchmarks/gpu_check.sh bench [HEAD...]  # python -m benchmarks.run --device cuda [--heads HEAD...]
#   bash benchmarks/gpu_check.sh all [HEAD...]    # both (may not fit one 10-minute call: split it)
#
# Writes at most 8 files to $OUT (what the device tool brings back): env.txt, tests.log, bench.log, and the
# runner's <tag>-<date>[-<heads>].json/.md/-<mode>.png; copies the results to benchmarks/results/ too.
# Wheels carried in wheels/ (benchmarks/fetch_wheels.sh) are installed first: trl, liger-kernel,
# cut-cross-entropy and the few dependencies the GPU image lacks.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
shift || true
OUT=${OUT:-/tmp/wpo-gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PY:-python3}
status=0

{
    echo "== $(date -u +%FT%TZ) stage=$stage heads=$*"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
    if compgen -G "wheels/*.whl" >/dev/null; then
        echo "== installing carried wheels: $(ls wheels)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            wheels/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "== no wheels/ folder: TRL, Liger and CCE are skipped unless the image has them"
    fi
    # wpo_kernels.integration maps to integration/ through pyproject's package-dir: install in place
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
        || echo "editable install failed: wpo_kernels imports from the checkout, integration tests may fail"
    "$PY" - <<'PYEOF'
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
for d in ("triton", "trl", "liger-kernel", "cut-cross-entropy", "transformers", "datasets", "wpo-kernels"):
    try:
        print(d, md.version(d))
    except md.PackageNotFoundError:
        print(d, "not installed")
PYEOF
} >"$OUT/env.txt" 2>&1
# (the { } block ran in this shell, so /tmp/site is already on PYTHONPATH where the wheels installed)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
cat "$OUT/env.txt"

if [[ $stage == tests || $stage == all ]]; then
    "$PY" -m pytest tests/ -m "gpu or not gpu" -q -ra --durations=15 2>&1 | tee "$OUT/tests.log"
    rc=${PIPESTATUS[0]}
    echo "== tests exit code $rc"
    ((rc == 0)) || status=1
fi

if [[ $stage == bench || $stage == all ]]; then
    heads=()
    (($#)) && heads=(--heads "$@")
    "$PY" -m benchmarks.run --device cuda "${heads[@]}" --out "$OUT" 2>&1 | tee "$OUT/bench.log"
    rc=${PIPESTATUS[0]}
    echo "== benchmarks exit code $rc"
    ((rc == 0)) || status=1
    mkdir -p benchmarks/results
    cp "$OUT"/cuda-*.json "$OUT"/cuda-*.md "$OUT"/cuda-*.png benchmarks/results/ 2>/dev/null || true
fi
exit $status
