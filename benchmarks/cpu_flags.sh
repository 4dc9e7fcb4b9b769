#!/usr/bin/env bash
# XLA:CPU flags against the CPU goals' points, each flag set in its own processes (XLA reads XLA_FLAGS once):
# training GPT-2 mini (6 x 384, fp32, batch 8 x 256, as the quick suite) and decoding 124M (fp32, 16-token prompt,
# 128 new tokens, top-k 40, batch 1 and 8). The baseline runs first and last, so its spread is beside the variants.
#
#     bash benchmarks/cpu_flags.sh [OUT_DIR]            # about 15 minutes on an idle 2-core CPU
#     ONLY=baseline,xnn_dots bash benchmarks/cpu_flags.sh   # some of the sets
#
# A flag this jaxlib does not know aborts its process; that set is reported as skipped. Writes OUT_DIR/<name>.json
# per set and prints one table per job (benchmarks.report); time on an idle machine only.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/cpu_flags}"
mkdir -p "$OUT"
PY=python3
[[ -x .venv/bin/python ]] && PY=.venv/bin/python

SETS=(
  "baseline|"
  "xnnpack|--xla_cpu_use_xnnpack=true"
  "xnn_dots|--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
  "xnn_graph|--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"
  "ynn_dots|--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
  "onednn_dots|--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
  "onednn|--xla_cpu_use_onednn=true"
  "fast_math|--xla_cpu_enable_fast_math=true"
  "vector_512|--xla_cpu_prefer_vector_width=512"
  "no_thunks|--xla_cpu_use_thunk_runtime=false"
  "baseline_again|"
)

for entry in "${SETS[@]}"; do
  name=${entry%%|*} flags=${entry#*|}
  [[ -n "${ONLY:-}" && ",$ONLY," != *",$name,"* ]] && continue
  if ! XLA_FLAGS="$flags" timeout 120 "$PY" -c "import jax; jax.numpy.zeros(8).block_until_ready()" >/dev/null 2>&1; then
    echo "=== $name ($flags): not accepted by this jaxlib; skipped"
    continue
  fi
  echo "=== $name ${flags:+($flags)}"
  XLA_FLAGS="$flags" timeout 600 "$PY" -m benchmarks --job train --preset mini --batch 8 --seq 256 --repeats 5 \
    --json "$OUT/$name-train.json" | grep -E "^train" || echo "=== $name: training failed"
  XLA_FLAGS="$flags" timeout 600 "$PY" -m benchmarks --job decode --preset 124M --batch 1,8 --seq 16 \
    --new_tokens 128 --top_k 40 --json "$OUT/$name-decode.json" | grep -E "^decode" || echo "=== $name: decode failed"
done
