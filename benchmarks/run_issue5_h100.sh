#!/usr/bin/env bash
# Issue 5 (H100): the Triton Hadamard kernels -- correctness on the GPU, bandwidth against a device-to-device copy,
# and SmolLM2-135M W4A4KV4 PTQ evaluation wall time with/without online Hadamards and PyTorch vs Triton backend.
#
#   bash benchmarks/run_issue5_h100.sh OUT_DIR DATA_DIR [PART ...]
#
# OUT_DIR: results (JSON per part, pytest log). DATA_DIR: the carried data folder (wikitext-2-raw-v1/test.jsonl,
# i.e. a copy of ../shared/data). PARTS (default: all, in this order), each well inside 10 minutes on an H100;
# all together take longer than one 10-minute call, so run e.g. `... tests micro` and `... e2e` separately:
#   tests   pytest tests/utils/test_hadamard_triton.py -k gpu: every size/dtype vs the dense reference, gradients,
#           fused quantization vs the PyTorch composition, every autotuner candidate, strides, the tiny model
#           (~3 min, mostly kernel compilation)
#   micro   benchmarks/bench_hadamard.py for bfloat16 and float32: triton/torch/dense/fused/unfused vs copy,
#           n = 64..16384 (+1536, 11008, 14336), rows 2^10..2^16 (~2 x 2-3 min, autotuning included)
#   e2e     W4A4KV4 RTN PTQ (the paper's flags, bf16, groups of 64) in separate processes: no rotation; rotation
#           without online Hadamards (--online_hadamard False); rotation with R3/R4 online on the PyTorch backend
#           (the GPU path before this issue) and on the Triton backend (twice); JSON + wall time per run (~2.5 min)
#   sweep   (not in the default list) launch-config sweep for bf16, to refine utils.hadamard_triton.launch_config
# Environment: PYTHON (default python3), MODEL (default smollm2-135m), EVAL_WINDOWS (default 0 = all 148).
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
if [ "${#PARTS[@]}" -eq 0 ]; then
  PARTS=(tests micro e2e)
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-smollm2-135m}
EVAL_WINDOWS=${EVAL_WINDOWS:-0}
export PYTHON
export PYTHONPATH="${ROOT}${PYTHONPATH:+:$PYTHONPATH}"
export SPINQUANT_DATA_DIR=$DATA
cd "$ROOT"
"$PYTHON" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"

for part in "${PARTS[@]}"; do
  start=$SECONDS
  case $part in
    tests)
      # -k gpu: the GPU set only (the interpreter set skips itself where CUDA exists). A failure is reported and
      # the other parts still run, so one call brings back everything.
      if ! "$PYTHON" -m pytest -q -p no:cacheprovider tests/utils/test_hadamard_triton.py -m gpu --durations=10 \
        --junitxml "$OUT/issue5_gpu_tests.xml" 2>&1 | tee "$OUT/issue5_gpu_tests.log"; then
        echo "[issue5] GPU TESTS FAILED: see $OUT/issue5_gpu_tests.log"
      fi
      ;;
    micro)
      "$PYTHON" benchmarks/bench_hadamard.py --dtypes bfloat16 --out "$OUT/issue5_bandwidth_bf16.json"
      "$PYTHON" benchmarks/bench_hadamard.py --dtypes float32 --out "$OUT/issue5_bandwidth_fp32.json"
      ;;
    sweep)
      "$PYTHON" benchmarks/bench_hadamard.py --sweep --out "$OUT/issue5_launch_sweep.json"
      ;;
    e2e)
      FLAGS="--w_rtn --k_groupsize 64 --v_groupsize 64 --seed 0 --no_progress --eval_windows $EVAL_WINDOWS"
      # Warm-up: compiles the Triton kernels of this model into Triton's on-disk cache, so the timed runs below
      # measure the steady state, as a user's second run would.
      SPINQUANT_HADAMARD_BACKEND=triton "$PYTHON" benchmarks/run_ptq_suite.py --out "$OUT" \
        --name issue5_e2e_warmup -- "$MODEL 4 4 4 $FLAGS --eval_windows 2"
      SPINQUANT_HADAMARD_BACKEND=torch "$PYTHON" benchmarks/run_ptq_suite.py --out "$OUT" --name issue5_e2e_torch -- \
        "$MODEL 4 4 4 $FLAGS --rotate False" \
        "$MODEL 4 4 4 $FLAGS --online_hadamard False" \
        "$MODEL 4 4 4 $FLAGS"
      SPINQUANT_HADAMARD_BACKEND=triton "$PYTHON" benchmarks/run_ptq_suite.py --out "$OUT" --name issue5_e2e_triton -- \
        "$MODEL 4 4 4 $FLAGS" \
        "$MODEL 4 4 4 $FLAGS --online_hadamard False" \
        "$MODEL 4 4 4 $FLAGS"
      "$PYTHON" benchmarks/bench_hadamard.py --e2e-summary "$OUT" --out "$OUT/issue5_e2e_summary.json"
      ;;
    *)
      echo "unknown part: $part (valid: tests micro e2e sweep)" >&2
      exit 2
      ;;
  esac
  echo "[issue5] $part done in $((SECONDS - start)) s"
done
