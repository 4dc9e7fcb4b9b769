#!/usr/bin/env bash
# One prepared call on a lent GPU machine (H100/H200, jax with CUDA, torch + transformers, no internet), ~7 minutes
# wall in all, compiles included. Run from the repository root:
#
#     OUT=/some/dir PYTHONPATH=. bash benchmarks/gpu.sh
#     GPT2_JAX_BENCH_DRY=1 OUT=/tmp/out bash benchmarks/gpu.sh     # the same steps at toy sizes, on any CPU
#     GPT2_JAX_BENCH_BUDGET=300 ...                                  # seconds for all steps (default 420)
#
# Steps, each its own process under a time limit drawn from one shared budget, so a crash, an out-of-memory or a
# hang in one step costs only that step (and a step killed at its limit keeps the points it finished):
#   1. the device (nvidia-smi)
#   2. benchmarks.gpu_check: bf16 matmul and copy ceilings, bf16/cuDNN logits against fp32 on a random 124M
#   3. 124M training at T=1024 in bf16 with cuDNN attention at three batch sizes, PyTorch at the middle one (layers
#      unrolled per scan step as train.py runs them on a GPU)
#   4. decode (124M, 16-token prompt, 128 new tokens, top-k 40) at batch 1/8/64, against PyTorch
#   5. the same training with XLA attention at one batch (last: the least important)
# Few distinct shapes on purpose: each costs a compile of ~30-60 s. PyTorch runs eagerly here (--torch_compile off:
# its compiles would not fit these limits); benchmarks/gpu_verify.sh times it under torch.compile too.
# Everything lands in $OUT: gpu.log (all output), gpu_check.json, one JSON per step, results.json (merged),
# results.png (tokens/s against batch) and results.txt (the table).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# PyTorch runs in the same processes for the ratios: leave it room instead of letting JAX take 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"

DRY="${GPT2_JAX_BENCH_DRY:-0}"
if [[ "$DRY" == "1" ]]; then
    BUDGET="${GPT2_JAX_BENCH_BUDGET:-300}"
    TRAIN=(--preset tiny --seq 64 --dtype float32)
    TRAIN_BATCHES=2,4,8 COMPARE_BATCH=4 XLA_BATCH=4 FAST_ATTENTION=xla
    DECODE=(--preset tiny --seq 16 --new_tokens 16 --dtype float32 --batch 1,8,64)
else
    BUDGET="${GPT2_JAX_BENCH_BUDGET:-420}"
    TRAIN=(--preset 124M --seq 1024 --dtype bfloat16)
    TRAIN_BATCHES=8,16,32 COMPARE_BATCH=16 XLA_BATCH=16 FAST_ATTENTION=cudnn
    DECODE=(--preset 124M --seq 16 --new_tokens 128 --dtype bfloat16 --batch 1,8,64)
fi
START=$SECONDS

# run_step NAME CAP COMMAND...: run under min(CAP, what is left of the budget); log a failure and go on.
run_step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 20)); then
        echo "=== $name: SKIPPED, ${left}s left of the ${BUDGET}s budget"
        return
    fi
    echo "=== $name (limit ${limit}s, $((SECONDS - START))s elapsed)"
    timeout --signal=TERM --kill-after=10 "$limit" "$@"
    local rc=$?
    if ((rc == 124)); then
        echo "=== $name: STOPPED at its ${limit}s limit; continuing"
    elif ((rc != 0)); then
        echo "=== $name: FAILED with exit code $rc; continuing"
    fi
}

main() {
    [[ "$DRY" == "1" ]] && echo "DRY RUN: the same steps at toy sizes"
    echo "=== device"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null ||
        echo "no nvidia-smi"

    run_step gpu_check 100 python -m benchmarks.gpu_check --json "$OUT/gpu_check.json"

    run_step "train, cuDNN attention" 170 \
        python -m benchmarks --job train "${TRAIN[@]}" --batch "$TRAIN_BATCHES" --attention "$FAST_ATTENTION" \
        --compare pytorch --torch_compile off --compare_at "$COMPARE_BATCH" --json "$OUT/train.json"

    run_step "decode" 110 \
        python -m benchmarks --job decode "${DECODE[@]}" --compare pytorch --torch_compile off --json "$OUT/decode.json"

    run_step "train, XLA attention" 70 \
        python -m benchmarks --job train "${TRAIN[@]}" --batch "$XLA_BATCH" --attention xla \
        --json "$OUT/train_xla.json"

    echo "=== all results ($((SECONDS - START))s elapsed)"
    local results=()
    for f in "$OUT/train.json" "$OUT/decode.json" "$OUT/train_xla.json"; do
        [[ -f "$f" ]] && results+=("$f")
    done
    if ((${#results[@]})); then
        python -m benchmarks.report "${results[@]}" --json "$OUT/results.json" --plot "$OUT/results.png" |
            tee "$OUT/results.txt"
    else
        echo "no step wrote results"
    fi
    echo "=== done in $((SECONDS - START))s; files in $OUT"
}

main 2>&1 | tee -a "$OUT/gpu.log"
