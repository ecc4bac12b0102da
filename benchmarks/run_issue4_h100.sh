#!/usr/bin/env bash
# Issue 4 benchmarks (H100): SmolLM2-135M WikiText-2 test perplexity, RTN versus GPTQ, for W4A16 and W4A4KV4 with
# random Hadamard rotation; zero-shot accuracy (lm-eval) for W16A16 and W4A4KV4 GPTQ with rotation.
#
#   bash benchmarks/run_issue4_h100.sh DATA_DIR OUT_DIR [PART ...]
#
# DATA_DIR: the carried data folder (wikitext-2-raw-v1/{test,validation}.jsonl and zeroshot/<task>/<split>.jsonl,
# i.e. a copy of ../shared/data). OUT_DIR: one JSON per run (named after the run). PARTS (default: all, in order),
# each one process-set well inside 10 minutes on an H100:
#   ppl_rtn           W4A16 and W4A4KV4 RTN                                   (2 runs, ~1 min)
#   ppl_gptq_w4a16    W4A16 GPTQ, 128 calibration windows of 2048 from validation  (1 run)
#   ppl_gptq_w4a4kv4  W4A4KV4 GPTQ, same calibration                           (1 run; the paper's code: 178 s)
#   zs_w16a16         zero-shot, full precision (no rotation), every task shipped in DATA_DIR/zeroshot
#   zs_w4a4kv4        zero-shot, W4A4KV4 GPTQ with rotation (also records its perplexity)
# Environment: ZS_LIMIT (examples per task; default: the full sets), ZS_BATCH (lm-eval batch size, default 64),
# PYTHON (default python3). Zero-shot needs lm-eval and its dependencies (carried wheels, see BENCHMARKS.md).
#
# Flags as the paper's runs on this model: bf16, --w_clip, asymmetric A/K/V, K/V groups of 64 (= head_dim, one
# group per head), seed 0, --rotate (random Hadamard R1/R2 + online R4, and R3 when K is quantized).
set -euo pipefail
if [ "$#" -lt 2 ]; then
  sed -n 2,20p "$0"
  exit 2
fi
DATA=$(cd "$1" && pwd)
OUT=$2
shift 2
PARTS=("$@")
if [ "${#PARTS[@]}" -eq 0 ]; then
  PARTS=(ppl_rtn ppl_gptq_w4a16 ppl_gptq_w4a4kv4 zs_w16a16 zs_w4a4kv4)
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHON=${PYTHON:-python3}
export SPINQUANT_DATA_DIR=$DATA
# Everything is local (the machine has no network): never wait on the hub.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
ZS_BATCH=${ZS_BATCH:-64}
LIMIT_ARGS=()
if [ -n "${ZS_LIMIT:-}" ]; then LIMIT_ARGS=(--limit "$ZS_LIMIT"); fi

COMMON=(--data_dir "$DATA" --seed 0 --k_groupsize 64 --v_groupsize 64 --no_progress)
GPTQ=(--nsamples 128 --calib_split validation --percdamp 0.01)
ZS=(--tasks_data_dir "$DATA/zeroshot" --lm_eval_batch_size "$ZS_BATCH" "${LIMIT_ARGS[@]}")

# run NAME W A KV [flags...]: the user-facing scripts/2_eval_ptq.sh, JSON to OUT/NAME.json, wall time logged.
run() {
  local name=$1 w=$2 a=$3 kv=$4
  shift 4
  echo "[issue4] $name: bash scripts/2_eval_ptq.sh smollm2-135m $w $a $kv ${COMMON[*]} $* --result_json $OUT/$name.json"
  local start=$SECONDS
  (cd "$ROOT" && bash scripts/2_eval_ptq.sh smollm2-135m "$w" "$a" "$kv" "${COMMON[@]}" "$@" \
    --result_json "$OUT/$name.json")
  echo "[issue4] $name done in $((SECONDS - start)) s"
}

for part in "${PARTS[@]}"; do
  case $part in
    ppl_rtn)
      run w4a16_rtn_had 4 16 16 --w_rtn
      run w4a4kv4_rtn_had 4 4 4 --w_rtn
      ;;
    ppl_gptq_w4a16) run w4a16_gptq_had 4 16 16 "${GPTQ[@]}" ;;
    ppl_gptq_w4a4kv4) run w4a4kv4_gptq_had 4 4 4 "${GPTQ[@]}" ;;
    zs_w16a16) run zs_w16a16 16 16 16 --rotate False "${ZS[@]}" ;;
    zs_w4a4kv4) run zs_w4a4kv4_gptq_had 4 4 4 "${GPTQ[@]}" "${ZS[@]}" ;;
    *)
      echo "unknown part $part (ppl_rtn ppl_gptq_w4a16 ppl_gptq_w4a4kv4 zs_w16a16 zs_w4a4kv4)" >&2
      exit 2
      ;;
  esac
done

"$PYTHON" - "$OUT" <<'EOF'
"""Print one line per run found in OUT (perplexity, zero-shot average, GPTQ and total seconds)."""
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(path.read_text())
    if "wiki2_ppl" not in r:
        continue
    zs = r.get("zeroshot") or {}
    tasks = ", ".join(f"{k} {100 * v['score']:.1f}" for k, v in zs.get("tasks", {}).items())
    avg = f"{100 * r['zeroshot_avg']:.2f}" if r.get("zeroshot_avg") is not None else "-"
    print(f"{path.stem:24s} ppl {r['wiki2_ppl']:9.3f}  0-shot avg {avg:>6s}  gptq {r['timings'].get('gptq', 0):6.1f} s"
          f"  total {r['timings']['total']:6.1f} s  {tasks}")
EOF
