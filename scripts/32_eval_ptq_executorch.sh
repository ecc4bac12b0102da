#!/usr/bin/env bash
# PTQ for ExecuTorch (the paper's script 32): 4-bit weights in groups of 32 (GPTQ, clip search), 8-bit dynamic
# asymmetric activations, rotation on, then --export_to_et writes the checkpoint ExecuTorch's Llama export reads
# for SpinQuant models (preq_mode 8da4w_output_8da8w, 8-bit per-channel embedding and output layer,
# use_spin_quant native). If ExecuTorch is installed (the optional extra: pip install executorch==1.5.1), the
# script then builds the .pte with ExecuTorch's own export and compares its next-token predictions on
# WikiText-2 with our quantized model's (python -m spinquant.export_executorch).
#
#   bash scripts/32_eval_ptq_executorch.sh [model] [extra flags...]
#   ROTATION_PATH=outputs/rotation/smollm2-135m_W16A8KV16_executorch/R.bin bash scripts/32_eval_ptq_executorch.sh
#   bash scripts/32_eval_ptq_executorch.sh smollm2-135m --w_rtn --bf16 False    # quick CPU run with RTN
#
# Output in $SPINQUANT_OUTPUT_DIR/ptq/<model>_W4A8_executorch/: executorch_model.bin (+ .params.json,
# .export.json), executorch_model_qmodel/ (our own saved model), ptq_result.json, and with ExecuTorch
# executorch_model.pte and executorch_model.compare.json.
# Environment:
#   SPINQUANT_OUTPUT_DIR  results root (default: outputs)
#   ROTATION_PATH         R.bin from scripts/31_optimize_rotation_executorch.sh (default: random Hadamard)
#   W_GROUPSIZE           weight group size (default 32; the paper's README: 256 for 8B models, 32 for smaller)
#   SPINQUANT_DATA_DIR    local dataset mirror (e.g. ../shared/data) instead of the hub
#   COMPARE_TOKENS        WikiText-2 tokens for the .pte comparison (default 256; 0 skips the .pte step)
#   PYTHON                interpreter (default python)
set -euo pipefail

MODEL=${1:-smollm2-135m}
if [ "$#" -ge 1 ]; then shift 1; fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
OUTPUT_ROOT=${SPINQUANT_OUTPUT_DIR:-outputs}
OUTPUT_DIR="${OUTPUT_ROOT}/ptq/$(basename "${MODEL%.gguf}")_W4A8_executorch"
CHECKPOINT="${OUTPUT_DIR}/executorch_model.bin"
COMPARE_TOKENS=${COMPARE_TOKENS:-256}

ROTATION_ARGS=()
if [ -n "${ROTATION_PATH:-}" ]; then
  ROTATION_ARGS=(--optimized_rotation_path "$ROTATION_PATH")
fi

export PYTHONPATH="${ROOT}${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -m spinquant.ptq \
  --input_model "$MODEL" \
  --do_train False \
  --do_eval True \
  --per_device_eval_batch_size 4 \
  --model_max_length 2048 \
  --fp16 False \
  --bf16 True \
  --save_safetensors False \
  --w_bits 4 \
  --a_bits 8 \
  --w_clip \
  --w_groupsize "${W_GROUPSIZE:-32}" \
  --a_asym \
  --rotate \
  --save_qmodel_path "$CHECKPOINT" \
  --export_to_et \
  --output_dir "$OUTPUT_DIR" \
  "${ROTATION_ARGS[@]}" \
  "$@"

if [ "$COMPARE_TOKENS" -le 0 ]; then
  exit 0
fi
if ! "$PYTHON" -c "import executorch" 2>/dev/null; then
  echo "[32_eval_ptq_executorch] ExecuTorch is not installed: skipping the .pte (pip install executorch==1.5.1)." >&2
  echo "  then: $PYTHON -m spinquant.export_executorch --checkpoint $CHECKPOINT --tokens $COMPARE_TOKENS" >&2
  exit 0
fi
DATA_ARGS=()
if [ -n "${SPINQUANT_DATA_DIR:-}" ]; then
  DATA_ARGS=(--data_dir "$SPINQUANT_DATA_DIR")
fi
exec "$PYTHON" -m spinquant.export_executorch --checkpoint "$CHECKPOINT" --tokens "$COMPARE_TOKENS" "${DATA_ARGS[@]}"
