#!/usr/bin/env bash
# Issue 6 (H100/H200): the paper's grid and random-rotation study on SmolLM2-135M with the experiment driver.
#
#   bash benchmarks/run_issue6_h100.sh OUT_DIR DATA_DIR [PART ...]
#
# OUT_DIR: the driver's folder (cells/, rotations/, results.json, table.md); everything resumes from what is there,
# so a part cut short by a time limit continues when run again. DATA_DIR: a copy of ../shared/data
# (wikitext-2-raw-v1; zeroshot/ for the zs part). PARTS (default: learn grid random):
#   learn    the learned rotations: had/no_had at W4A4KV4 (for RTN) and W16A4KV4 (for GPTQ), shared across the
#            columns (--rotation_policy shared), plus had W4A4KV4 seeds 1..LEARNED_SEEDS-1 for the random study;
#            each 100 steps, global batch 8 x 2048, calibrated on the validation split (~1.5 min each)
#   grid     the paper grid: 41 cells, RTN and GPTQ weights (~7 min)
#   random   W4A4KV4 RTN over RANDOM_SEEDS random orthogonal and random Hadamard rotations and the learned ones
#   zs       the zero-shot column (lm-eval, every task in DATA_DIR/zeroshot) for the W4A4KV4 cells and FP
# Environment: PYTHON (default python3), MODEL (default smollm2-135m), RANDOM_SEEDS (10), LEARNED_SEEDS (3),
# MAX_CELLS (stop after N new cells; default all), ZS_LIMIT (zero-shot examples per task; default all).
set -euo pipefail
if [ "$#" -lt 2 ]; then
  sed -n "2,/^set -euo/p" "$0" | sed "\$d"
  exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
DATA=$(cd "$2" && pwd)
shift 2
PARTS=("$@")
if [ "${#PARTS[@]}" -eq 0 ]; then PARTS=(learn grid random); fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="${ROOT}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-smollm2-135m}
RANDOM_SEEDS=${RANDOM_SEEDS:-10}
LEARNED_SEEDS=${LEARNED_SEEDS:-3}
DRIVER=("$PYTHON" -m spinquant.experiments --model "$MODEL" --out "$OUT" --data_dir "$DATA"
        --calib_split validation --rotation_policy shared --random_seeds "$RANDOM_SEEDS"
        --learned_seeds "$LEARNED_SEEDS" ${MAX_CELLS:+--max_cells "$MAX_CELLS"})

for part in "${PARTS[@]}"; do
  start=$(date +%s)
  case "$part" in
    learn) "${DRIVER[@]}" --grid all --learn_only ;;
    grid) "${DRIVER[@]}" --grid paper ;;
    random) "${DRIVER[@]}" --grid random ;;
    zs)
      "${DRIVER[@]}" --grid paper --bits W4A4KV4 --tasks --tasks_data_dir "$DATA/zeroshot" \
        ${ZS_LIMIT:+--limit "$ZS_LIMIT"}
      ;;
    *) echo "unknown part '$part' (parts: learn grid random zs)" >&2; exit 2 ;;
  esac
  echo "[issue6] part $part done in $(( $(date +%s) - start )) s" >&2
done
