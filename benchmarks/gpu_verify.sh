#!/usr/bin/env bash
# The accelerator goals (issue 13) in one prepared call on a lent H100/H200: about 8 minutes wall, compiles included.
# From the repository root:
#
#     OUT=/some/dir bash benchmarks/gpu_verify.sh                         # on the device
#     GPT2_JAX_BENCH_DRY=1 OUT=/tmp/vout bash benchmarks/gpu_verify.sh    # the same steps at toy sizes, on any CPU
#     GPU_VERIFY_BUDGET=300 ...                                           # seconds for all steps (default 470)
#
# Steps in order of value, each `python -m benchmarks.gpu_verify PHASE` (its docstring says what each measures) in
# its own process, under min(its cap, what is left of the budget), so a crash, an out-of-memory or a hang costs one
# step; steps that no longer fit are skipped, and the summary always runs:
#   device, train (with the first-step loss check), decode (with the 1000-token generation), train_pytorch and
#   decode_pytorch (Hugging Face eager and torch.compile beside ours), benchmarks.gpu_check (bf16/cuDNN and cached
#   decoding against fp32 on the device), then XLA flag variants: cuBLASLt for training and decoding, training
#   without Triton GEMMs.
# Compiles are bounded by few shapes and kept in persistent caches (JAX's below, inductor's in /tmp), so a rerun on
# a still-warm machine skips them. JAX preallocates its usual 75% of the GPU except where PyTorch shares the process.
# $OUT gets at most 5 files: gpu_verify.log (all output), records.jsonl (one line per measurement), gpu_check.json,
# summary.txt (each goal met or not, tables) and <card>-verify-<date>.json (for benchmarks/results/).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/gpt2_jax_verify_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.1
OUT="${OUT:-/tmp/gpu_verify_out}"
mkdir -p "$OUT"
PY=python3
[[ -x .venv/bin/python ]] && PY=.venv/bin/python # this checkout's environment where there is one
BUDGET="${GPU_VERIFY_BUDGET:-470}"
START=$SECONDS

# step NAME CAP [VAR=VALUE...] -- COMMAND...: run under min(CAP, budget left); a failure is logged, not fatal.
step() {
    local name=$1 cap=$2
    shift 2
    local envs=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do
        envs+=("$1")
        shift
    done
    shift
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 20)); then
        echo "=== $name: SKIPPED, ${left}s left of the ${BUDGET}s budget"
        return
    fi
    echo "=== $name (limit ${limit}s, $((SECONDS - START))s elapsed)"
    env "${envs[@]}" GPU_VERIFY_DEADLINE=$(($(date +%s) + limit - 5)) \
        timeout --signal=TERM --kill-after=10 "$limit" "$@"
    local rc=$?
    if ((rc == 124)); then
        echo "=== $name: STOPPED at its ${limit}s limit; continuing"
    elif ((rc != 0)); then
        echo "=== $name: FAILED with exit code $rc; continuing"
    fi
}

# flags_ok FLAGS: does this jaxlib's XLA accept FLAGS? (an unknown flag aborts the process)
flags_ok() { XLA_FLAGS="$1" timeout 60 "$PY" -c "import jax; jax.numpy.zeros(8).block_until_ready()" >/dev/null 2>&1; }

main() {
    [[ "${GPT2_JAX_BENCH_DRY:-0}" == "1" ]] && echo "DRY RUN: the same steps at toy sizes"
    local verify=("$PY" -m benchmarks.gpu_verify)
    local shared=(XLA_PYTHON_CLIENT_PREALLOCATE=false) # PyTorch runs in the same process: leave it room
    step device 60 -- "${verify[@]}" device --out "$OUT"
    step train 150 -- "${verify[@]}" train --out "$OUT"
    step decode 110 -- "${verify[@]}" decode --out "$OUT"
    step "train beside PyTorch" 150 "${shared[@]}" -- "${verify[@]}" train_pytorch --out "$OUT"
    step "decode beside PyTorch" 150 "${shared[@]}" -- "${verify[@]}" decode_pytorch --out "$OUT"
    step gpu_check 80 -- "$PY" -m benchmarks.gpu_check --json "$OUT/gpu_check.json"
    local flags
    for flags in "--xla_gpu_enable_cublaslt=true" "--xla_gpu_enable_triton_gemm=false"; do
        if ! flags_ok "$flags"; then
            echo "=== $flags: this XLA does not accept it; skipped"
            continue
        fi
        step "train, $flags" 60 XLA_FLAGS="$flags" -- "${verify[@]}" train_variant --out "$OUT"
        [[ "$flags" == *cublaslt* ]] &&
            step "decode, $flags" 60 XLA_FLAGS="$flags" -- "${verify[@]}" decode_variant --out "$OUT"
    done
    echo "=== summary ($((SECONDS - START))s elapsed)"
    JAX_PLATFORMS=cpu "${verify[@]}" summary --out "$OUT"
    echo "=== done in $((SECONDS - START))s; files in $OUT"
}

main 2>&1 | tee -a "$OUT/gpu_verify.log"
