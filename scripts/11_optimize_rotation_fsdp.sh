#!/usr/bin/env bash
# Rotation learning with FSDP, for models that do not fit one GPU: scripts/10_optimize_rotation.sh plus
# --fsdp "full_shard auto_wrap". The frozen model is sharded across the GPUs (each decoder layer its own FSDP unit,
# the class found from the model; FSDP_LAYER_CLS overrides it, e.g. LlamaDecoderLayer); R1/R2 stay whole on every
# GPU and their gradients are all-reduced. Under FSDP the rotated weights are computed inside each layer on every
# forward (as the paper's code), so a step costs more than with scripts/10 -- use 10 whenever the model fits.
#
#   bash scripts/11_optimize_rotation_fsdp.sh [model] [w_bits] [a_bits] [kv_bits] [extra flags...]
#   bash scripts/11_optimize_rotation_fsdp.sh meta-llama/Llama-2-70b-hf 4 4 4
#
# Same environment variables as scripts/10_optimize_rotation.sh (outputs go to .../rotation/<run>_fsdp/).
set -euo pipefail

MODEL=${1:-smollm2-135m}
W_BITS=${2:-4}
A_BITS=${3:-4}
KV_BITS=${4:-4}
if [ "$#" -ge 4 ]; then shift 4; else shift "$#"; fi

FSDP_ARGS=(--fsdp "full_shard auto_wrap")
if [ -n "${FSDP_LAYER_CLS:-}" ]; then
  FSDP_ARGS+=(--fsdp_transformer_layer_cls_to_wrap "$FSDP_LAYER_CLS")
fi

RUN_SUFFIX=${RUN_SUFFIX:-_fsdp} exec bash "$(dirname "${BASH_SOURCE[0]}")/10_optimize_rotation.sh" \
  "$MODEL" "$W_BITS" "$A_BITS" "$KV_BITS" "${FSDP_ARGS[@]}" "$@"
