#!/usr/bin/env bash
# Issue 12's GPU checks in one call, as run on the lent H200: the CUDA tests (tests/gpu), then
# bench/gpu_decode.py (extra arguments are passed to it). Logs, the card's state and the JSON
# land in $OUT (default ./gpu_out). Uses the machine's python3 (its torch, triton, transformers).
# Bounded by TEST_TIMEOUT + BENCH_TIMEOUT (default 150 + 180 s: within 6 minutes with the install);
# the benchmark writes its JSON after every side, so one cut short still keeps what it measured.
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >"$out/card.txt" 2>&1
python3 -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)' \
    >>"$out/card.txt" 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || {
    cat "$out/install.log"
    exit 1
}
cat "$out/card.txt"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -rs tests/gpu 2>&1 | tee "$out/tests.log" | tail -n 30
timeout "${BENCH_TIMEOUT:-180}" python3 bench/gpu_decode.py --json "$out/gpu_decode.json" "$@" 2>&1 |
    tee "$out/bench.log" | grep -v '^#   '
