#!/usr/bin/env bash
# Rotation learning with the paper's recipe: Cayley SGD on R1/R2 of the fake-quantized network, 100 steps, lr 1.5
# cosine, global batch 8 x 2048 tokens, bf16, gradient checkpointing, RTN clip search, asymmetric activations and
# KV, K/V groups of 128. Writes R.bin for scripts/2_eval_ptq.sh (ROTATION_PATH=... or --optimized_rotation_path).
#
#   bash scripts/10_optimize_rotation.sh [model] [w_bits] [a_bits] [kv_bits] [extra flags...]
#   bash scripts/10_optimize_rotation.sh smollm2-135m 4 4 4                 # W4A4KV4 (R.bin for RTN)
#   bash scripts/10_optimize_rotation.sh smollm2-135m 16 4 4                # W16A4KV4 (the R.bin to use with GPTQ)
#
# model defaults to the built-in smollm2-135m; bits default to 4 4 4. Extra flags pass through and win over the
# defaults below (argparse keeps the last value).
# GPUs: all visible GPUs are used (torchrun, one process each) -- the largest power of two up to 8 of them, so the
# global batch of 8 splits evenly; the per-device batch is 8 / processes, with no gradient accumulation. Override
# with NPROC (processes) and PER_DEVICE_BATCH (blocks per micro-batch; accumulation then makes up the rest).
# Environment:
#   SPINQUANT_OUTPUT_DIR  results root (default: outputs); everything lands in $SPINQUANT_OUTPUT_DIR/rotation/<run>/
#   ROTATION_PATH         where R.bin goes (default: <that folder>/R.bin)
#   SPINQUANT_DATA_DIR    local dataset mirror (e.g. ../shared/data) instead of the hub
#   CALIB_SPLIT           WikiText-2 split to learn on (default: train, as the paper; ../shared/data: validation)
#   GLOBAL_BATCH          blocks per step over all GPUs (default 8, the paper's 8 GPUs x 1)
#   PYTHON                interpreter (default python)
set -euo pipefail

MODEL=${1:-smollm2-135m}
W_BITS=${2:-4}
A_BITS=${3:-4}
KV_BITS=${4:-4}
if [ "$#" -ge 4 ]; then shift 4; else shift "$#"; fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
OUTPUT_ROOT=${SPINQUANT_OUTPUT_DIR:-outputs}
RUN_NAME="$(basename "${MODEL%.gguf}")_W${W_BITS}A${A_BITS}KV${KV_BITS}${RUN_SUFFIX:-}"
OUTPUT_DIR="${OUTPUT_ROOT}/rotation/${RUN_NAME}"
GLOBAL_BATCH=${GLOBAL_BATCH:-8}

export PYTHONPATH="${ROOT}${PYTHONPATH:+:$PYTHONPATH}"

# Number of GPUs: nvidia-smi if present, else torch; 0 on a CPU-only machine.
count_gpus() {
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU' || true
  else
    "$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
  fi
}
NGPU=$(count_gpus)
if [ -z "${NPROC:-}" ]; then
  # The largest power of two <= min(NGPU, GLOBAL_BATCH) that divides GLOBAL_BATCH (1 on a CPU).
  NPROC=1
  while [ $((NPROC * 2)) -le "$NGPU" ] && [ $((NPROC * 2)) -le "$GLOBAL_BATCH" ] \
        && [ $((GLOBAL_BATCH % (NPROC * 2))) -eq 0 ]; do
    NPROC=$((NPROC * 2))
  done
fi
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-$((GLOBAL_BATCH / NPROC))}
echo "[10_optimize_rotation] ${NGPU} GPU(s) found: ${NPROC} process(es) x per-device batch ${PER_DEVICE_BATCH}," \
     "global batch ${GLOBAL_BATCH}; output in ${OUTPUT_DIR}" >&2

if [ "$NPROC" -gt 1 ]; then
  LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" -m spinquant.optimize_rotation)
else
  LAUNCH=("$PYTHON" -m spinquant.optimize_rotation)
fi

DATA_ARGS=()
if [ -n "${CALIB_SPLIT:-}" ]; then
  DATA_ARGS+=(--calib_split "$CALIB_SPLIT")
fi

exec "${LAUNCH[@]}" \
  --input_model "$MODEL" \
  --output_rotation_path "${ROTATION_PATH:-${OUTPUT_DIR}/R.bin}" \
  --output_dir "$OUTPUT_DIR" \
  --logging_dir "$OUTPUT_DIR" \
  --model_max_length 2048 \
  --fp16 False \
  --bf16 True \
  --log_on_each_node False \
  --per_device_train_batch_size "$PER_DEVICE_BATCH" \
  --global_batch_size "$GLOBAL_BATCH" \
  --logging_steps 1 \
  --learning_rate 1.5 \
  --weight_decay 0. \
  --lr_scheduler_type cosine \
  --gradient_checkpointing True \
  --save_safetensors False \
  --max_steps 100 \
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
  "${DATA_ARGS[@]}" \
  "$@"
