#!/usr/bin/env bash
# One device session, JSON and logs into $OUT. Run from the repository root on a machine with a CUDA GPU and
# torch + triton installed:
#   PARTS="tests ops step train" bash bench/gpu_run.sh [pytest -k expression for the op benchmarks]
# PARTS picks what runs (default: all, about 12 minutes on an H100/H200; size it to the device time left):
#   tests  native-GPU tests: kernels, no host sync in the ops and in a whole step, CUDA graphs
#   ops    op benchmarks (bench/test_ops.py, bench/test_bacl.py) and their summary
#   step   gsema-fast bench-step, SwinUNETR F=48 96^3 bf16 compiled, twice: cold, then warm compile cache
#   train  gsema-fast train with the gpu config (time to the end, Dice on the unseen centre)
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
PARTS=${PARTS:-tests ops step train}
part() { [[ " $PARTS " == *" $1 "* ]]; }
if part tests; then
    # First the kernels natively against their references, then every test marked gpu (graph capture, the compile
    # cache, two devices, bf16 and fp16 autocast, peak memory): together what the CPU suite cannot execute.
    timeout 240 python3 -m pytest -q tests/test_ops_gsema.py tests/test_bacl.py tests/test_bacl_kernels.py \
        tests/test_ema.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests.txt"
    timeout 180 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tail -15 | tee -a "$OUT/tests.txt"
fi
if part ops; then
    timeout 300 python3 -m pytest -q bench/test_ops.py bench/test_bacl.py -p no:cacheprovider ${1:+-k "$1"} \
        --benchmark-json="$OUT/bench_gpu.json" 2>&1 | tail -5 | tee "$OUT/bench.txt"
    python3 -m bench.summarize "$OUT/bench_gpu.json" | tee "$OUT/summary.md"
fi
if part step; then
    cache=$(mktemp -d)  # a cold compile cache for the first run, warm for the second
    for run in cold warm; do
        loader=""
        [[ $run == warm ]] && loader=--no-loader  # the loader is timed once, on the cold run
        XDG_CACHE_HOME=$cache timeout 420 python3 -m gsema_fast bench-step --config gpu --set model.feature_size=48 \
            --set data.batch_size=1 --steps 10 --warmup 3 $loader --out "$OUT/bench_step_$run.json" 2>&1 | tail -3 \
            | tee -a "$OUT/bench_step.txt"
    done
    rm -rf "$cache"
fi
if part train; then
    started=$SECONDS
    timeout 600 python3 -m gsema_fast train --config gpu --out "$OUT/run" 2>&1 | grep -v "it/s" | tail -25 \
        | tee "$OUT/train.txt"
    echo "train: $((SECONDS - started)) s wall" | tee -a "$OUT/train.txt"
    rm -rf "$OUT/run/checkpoints"  # too large to bring back; summary.json, log.jsonl and progress.png stay
fi
