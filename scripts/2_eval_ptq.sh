#!/usr/bin/env bash
# PTQ evaluation with the paper's defaults (W/A/KV bits from the command line, RTN clip search, asymmetric
# activations and KV, K/V groups of 128, rotation on).
#
#   bash scripts/2_eval_ptq.sh [model] [w_bits] [a_bits] [kv_bits] [extra flags...]
#   bash scripts/2_eval_ptq.sh meta-llama/Llama-3.2-1B 4 4 4 --optimized_rotation_path R.bin
#
# model defaults to the built-in smollm2-135m; bits default to 4 4 4. Extra flags pass through and win over
# the defaults below (argparse keeps the last value).
# Environment:
#   SPINQUANT_OUTPUT_DIR  results root (default: outputs); the JSON lands in $SPINQUANT_OUTPUT_DIR/ptq/<run>/
#   ROTATION_PATH         an R.bin to use instead of random Hadamard rotations (same as --optimized_rotation_path)
#   SPINQUANT_DATA_DIR    local dataset mirror (e.g. ../shared/data) instead of the hub
#   EVAL_BATCH_SIZE       windows per forward (default 4, the paper's); PYTHON: interpreter (default python)
#
# K/V group size: 128 is the paper's "one group per head" on LLaMA (head_dim 128). On a model whose head_dim is
# smaller (SmolLM2: 64), a group larger than head_dim is clamped to head_dim -- one group per head -- with a
# warning, and the result JSON records the value used under resolved.quant.
set -euo pipefail

MODEL=${1:-smollm2-135m}
W_BITS=${2:-4}
A_BITS=${3:-4}
KV_BITS=${4:-4}
if [ "$#" -ge 4 ]; then shift 4; else shift "$#"; fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
OUTPUT_ROOT=${SPINQUANT_OUTPUT_DIR:-outputs}
RUN_NAME="$(basename "${MODEL%.gguf}")_W${W_BITS}A${A_BITS}KV${KV_BITS}"
OUTPUT_DIR="${OUTPUT_ROOT}/ptq/${RUN_NAME}"

ROTATION_ARGS=()
if [ -n "${ROTATION_PATH:-}" ]; then
  ROTATION_ARGS=(--optimized_rotation_path "$ROTATION_PATH")
fi

export PYTHONPATH="${ROOT}${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m spinquant.ptq \
  --input_model "$MODEL" \
  --do_train False \
  --do_eval True \
  --per_device_eval_batch_size "${EVAL_BATCH_SIZE:-4}" \
  --model_max_length 2048 \
  --fp16 False \
  --bf16 True \
  --save_safetensors False \
  --w_bits "$W_BITS" \
  --a_bits "$A_BITS" \
  --k_bits "$KV_BITS" \
  --v_bits "$KV_BITS" \
  --w_clip \
  --a_asym \
  --k_asym \
  --v_asym \
  --k_groupsize 128 \
  --v_groupsize 128 \
  --rotate \
  --output_dir "$OUTPUT_DIR" \
  "${ROTATION_ARGS[@]}" \
  "$@"
