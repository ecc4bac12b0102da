#!/usr/bin/env bash
# Rotation learning for an ExecuTorch model (the paper's script 31): R1/R2 learned with only the activations
# quantized, 8-bit asymmetric per token (W16A8, KV in 16 bits), RTN clip search, weight groups of 32 -- the
# network ExecuTorch runs, whose 4-bit weights then come from GPTQ in scripts/32_eval_ptq_executorch.sh.
# Everything else (Cayley SGD, 100 steps, lr 1.5 cosine, global batch 8 x 2048 tokens, bf16, GPU count) is
# scripts/10_optimize_rotation.sh, which this script calls.
#
#   bash scripts/31_optimize_rotation_executorch.sh [model] [extra flags...]
#   bash scripts/31_optimize_rotation_executorch.sh smollm2-135m
#   ROTATION_PATH=outputs/R_et.bin bash scripts/31_optimize_rotation_executorch.sh meta-llama/Llama-3.2-1B
#
# Environment (besides those of scripts/10_optimize_rotation.sh):
#   W_GROUPSIZE  weight group size (default 32; the paper's README: 256 for 8B models, 32 for smaller ones)
#
# Note: with --export_to_et, PTQ zero-pads an MLP whose intermediate size is not a power of two (SmolLM2: 1536 ->
# 2048) so that ExecuTorch's Hadamard can run R4; rotation learning does not need that (R1/R2 do not depend on
# the intermediate size), so the R.bin learned here applies to the padded model unchanged.
set -euo pipefail

MODEL=${1:-smollm2-135m}
if [ "$#" -ge 1 ]; then shift 1; fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

RUN_SUFFIX=${RUN_SUFFIX:-_executorch} exec bash "${ROOT}/scripts/10_optimize_rotation.sh" "$MODEL" 16 8 16 \
  --w_groupsize "${W_GROUPSIZE:-32}" \
  "$@"
