#!/usr/bin/env bash
# Issue 7: rotation learning on several GPUs (FSDP and data parallel) against one GPU, recorded as JSON.
#
#   bash benchmarks/run_issue7.sh OUT_DIR DATA_DIR [part ...]
#
# OUT_DIR: results. DATA_DIR: a copy of ../shared/data (wikitext-2-raw-v1/). NGPU (default: every visible GPU) is
# the process count of the multi-GPU parts; with NGPU=1 they still run the same code (FSDP in one process).
# Every SmolLM2 part is the paper's recipe of scripts/10 (W4A4KV4, 100 steps, global batch 8 x 2048, lr 1.5 cosine,
# bf16) with --variant had --seed 0, learned on the WikiText-2 validation split -- the settings of the issue 6 grid,
# so the one-GPU run is comparable with benchmarks/results/issue6_h200/rotations/had-W4A4KV4-seed0.
# Parts (each well inside 10 minutes on an H200; run them as separate calls):
#   one      scripts/10_optimize_rotation.sh on one GPU (NPROC=1)                       -> smol_one.json
#   dp       scripts/10_optimize_rotation.sh data parallel on NGPU GPUs                 -> smol_dp<N>.json
#   fsdp     scripts/11_optimize_rotation_fsdp.sh on NGPU GPUs                          -> smol_fsdp<N>.json
#   ppl      W4A4KV4 RTN (--w_rtn) WikiText-2 test perplexity of every R.bin learned above, plus REFERENCE_RBIN if set
#            (e.g. the issue 6 one-GPU rotation)                                        -> smol_ppl.json
#   llama7b_one / llama7b_dp / llama7b_fsdp
#            LLaMA-2-7B-shaped random model (benchmarks/bench_rotation_learning.py random-model), 3 measured steps:
#            step time, tokens/s, peak memory per GPU                                  -> llama7b_<part>.json
# Environment: PYTHON (python3), MODEL (smollm2-135m), WORK (scratch, /tmp/spinquant_issue7), STEPS (100).
# Dry-run knobs (a CPU check of the script; leave unset for the benchmark): LEARN_FLAGS, PTQ_FLAGS, LLAMA_ARGS
# (extra flags for the learning runs, the perplexity runs and random-model).
set -euo pipefail
if [ "$#" -lt 2 ]; then
  sed -n "2,/^set -euo/p" "$0" | sed "\$d"
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
DATA=$(cd "$2" && pwd)
shift 2
PARTS=("$@")
if [ "${#PARTS[@]}" -eq 0 ]; then PARTS=(one dp fsdp ppl llama7b_one llama7b_dp llama7b_fsdp); fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PYTHON=${PYTHON:-python3}
export PYTHONPATH="${ROOT}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# NVLink multicast off (the lent machines do not support it).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
MODEL=${MODEL:-smollm2-135m}
WORK=${WORK:-/tmp/spinquant_issue7}
STEPS=${STEPS:-100}
if [ -z "${NGPU:-}" ]; then
  NGPU=$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
mkdir -p "$WORK"
export SPINQUANT_DATA_DIR=$DATA CALIB_SPLIT=validation SPINQUANT_OUTPUT_DIR=$WORK

learn() {  # script name nproc [extra...]
  local script=$1 name=$2 nproc=$3
  shift 3
  echo "[issue7] $name: $script on $nproc process(es)" >&2
  NPROC=$nproc RUN_SUFFIX="_$name" ROTATION_PATH="$WORK/$name/R.bin" bash "scripts/$script" "$MODEL" 4 4 4 \
    --variant had --seed 0 --max_steps "$STEPS" --no_progress --result_json "$OUT/smol_$name.json" ${LEARN_FLAGS:-} "$@"
}

llama() {  # name nproc [extra...]
  local name=$1 nproc=$2
  shift 2
  local launch=("$PYTHON")
  if [ "$nproc" -gt 1 ]; then launch=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc"); fi
  "${launch[@]}" benchmarks/bench_rotation_learning.py random-model --out "$OUT/llama7b_$name.json" --steps 3 \
    "$@" ${LLAMA_ARGS:-}
}

for part in "${PARTS[@]}"; do
  start=$SECONDS
  case $part in
    one) learn 10_optimize_rotation.sh one 1 ;;
    dp) learn 10_optimize_rotation.sh "dp$NGPU" "$NGPU" ;;
    fsdp) learn 11_optimize_rotation_fsdp.sh "fsdp$NGPU" "$NGPU" ;;
    ppl)
      results=()
      for rbin in "$WORK"/*/R.bin ${REFERENCE_RBIN:-}; do
        [ -f "$rbin" ] || continue
        name=$(basename "$(dirname "$rbin")")
        if [ -n "${REFERENCE_RBIN:-}" ] && [ "$rbin" = "$REFERENCE_RBIN" ]; then name=reference; fi
        echo "[issue7] W4A4KV4 RTN perplexity with $rbin" >&2
        ROTATION_PATH=$rbin bash scripts/2_eval_ptq.sh "$MODEL" 4 4 4 --w_rtn --variant had --no_progress \
          --data_dir "$DATA" --output_dir "$WORK/ptq_$name" --result_json "$WORK/ppl_$name.json" ${PTQ_FLAGS:-}
        results+=("$WORK/ppl_$name.json")
      done
      "$PYTHON" benchmarks/bench_rotation_learning.py merge --out "$OUT/smol_ppl.json" "${results[@]}"
      ;;
    llama7b_one) llama one 1 ;;
    llama7b_dp) llama "dp$NGPU" "$NGPU" ;;
    llama7b_fsdp) llama "fsdp$NGPU" "$NGPU" --fsdp ;;
    *)
      echo "unknown part '$part' (parts: one dp fsdp ppl llama7b_one llama7b_dp llama7b_fsdp)" >&2
      exit 2
      ;;
  esac
  echo "[issue7] part $part done in $((SECONDS - start)) s" >&2
done
