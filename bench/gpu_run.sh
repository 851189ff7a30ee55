#!/usr/bin/env bash
# One device session: native-GPU tests of the kernels, then the benchmarks, JSON and logs into $OUT.
# Run from the repository root on a machine with a CUDA GPU and torch + triton installed:
#   bash bench/gpu_run.sh [pytest -k expression for the benchmarks]
# Wheels of missing pure-Python packages may lie in .whl/ (installed to a private target, never system-wide).
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Without an install, gsema_fast.kernels is the top-level kernels/ folder through a link.
python3 -c "import gsema_fast.kernels" 2>/dev/null || ln -sfn ../kernels gsema_fast/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
timeout 240 python3 -m pytest -q -x tests/test_ops_gsema.py tests/test_bacl.py -p no:cacheprovider 2>&1 | tail -15 \
    | tee "$OUT/tests.txt"
timeout 300 python3 -m pytest -q bench/test_ops.py bench/test_bacl.py -p no:cacheprovider ${1:+-k "$1"} \
    --benchmark-json="$OUT/bench_gpu.json" 2>&1 | tail -5 | tee "$OUT/bench.txt"
python3 -m bench.summarize "$OUT/bench_gpu.json" | tee "$OUT/summary.md"
