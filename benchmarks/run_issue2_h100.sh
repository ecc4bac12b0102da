#!/usr/bin/env bash
# Issue 2 benchmarks: SmolLM2-135M WikiText-2 test perplexity under the paper's PTQ flags (bf16, --w_clip,
# asymmetric A/K/V, K/V groups of 64 = one per head), RTN weights, each run a separate process.
#   bash benchmarks/run_issue2_h100.sh DATA_DIR OUT_DIR
set -euo pipefail
DATA=$1
OUT=$2
export SPINQUANT_DATA_DIR=$DATA
KV="--k_groupsize 64 --v_groupsize 64 --w_rtn"
python3 benchmarks/run_ptq_suite.py --out "$OUT" --name issue2_ptq -- \
  "smollm2-135m 16 16 16 $KV --rotate False" \
  "smollm2-135m 4 16 16 $KV --rotate False" \
  "smollm2-135m 4 16 16 $KV" \
  "smollm2-135m 4 4 4 $KV --rotate False" \
  "smollm2-135m 4 4 4 $KV --seed 0" \
  "smollm2-135m 4 4 4 $KV --seed 1" \
  "smollm2-135m 4 4 4 $KV --seed 2" \
  "smollm2-135m 4 8 8 $KV"
