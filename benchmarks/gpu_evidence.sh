#!/usr/bin/env bash
# The whole GPU check of a lent machine, in one device call (benchmarks/README.md, "On a lent GPU"):
#
#   bash benchmarks/gpu_evidence.sh [ARGS...]      # python -m benchmarks.gpu_evidence --out $OUT ARGS...
#
# First installs the wheels carried in wheels/ (benchmarks/fetch_wheels.sh: trl, liger-kernel,
# cut-cross-entropy and the few dependencies the GPU image lacks) into /tmp/site, ahead of the image's
# packages; then runs the evidence script, its output also in $OUT/run.log. Nothing is pip-installed from
# the checkout: the stages put it on PYTHONPATH. $WHEELS overrides the wheel folder, $PY the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/wpo-gpu-evidence}
WHEELS=${WHEELS:-wheels}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
{
    echo "== $(date -u +%FT%TZ) on $(uname -n): $PY -m benchmarks.gpu_evidence --out $OUT $*"
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "== installing carried wheels: $(cd "$WHEELS" && echo *.whl)"
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$WHEELS"/*.whl; then
            export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        else
            echo "== installing the wheels failed: the peers that need them will say so in the report"
        fi
    else
        echo "== no $WHEELS/*.whl (benchmarks/fetch_wheels.sh): peers the image lacks are skipped, with the reason"
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    "$PY" -m benchmarks.gpu_evidence --out "$OUT" "$@"
} 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
