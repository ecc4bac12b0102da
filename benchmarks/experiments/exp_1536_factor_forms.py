"""Experiment behind the factor-last form's two-part split (utils/hadamard_triton.py, _split_dot): where does
n = 1536 = 12 x 128 lose bandwidth? Variants of the factor-last kernel (butterflies on the [16, 128] tile of one
row, then the 12 x 12 factor as a dot), GPU time per call from CUDA graphs (bench_hadamard._time_graph_ms) against a
copy of the same bytes. Some variants compute wrong values on purpose (they isolate a cost); none is used by the
library.

    python benchmarks/experiments/exp_1536_factor_forms.py --out exp.json --modes 0,1,2,3,4,5 --warps 1,2,4 \
        --rows 65536,16384      # benchmarks/results/issue5_h200/exp_1536_factor_forms_a.json
    python benchmarks/experiments/exp_1536_factor_forms.py --out exp.json --modes 0,1,3,6,7 --warps 1,2 \
        --rows 65536            # ..._b.json

(Those two files came from an earlier form of this script that timed the copy next to every variant.)

Modes: 0 three bfloat16 parts (the float32-input form), 1 butterflies only (no factor), 2 float32 FMA dot,
3 one bfloat16 dot (inexact), 4 mode 0 on a full 16 x 128 tile of 2048-wide rows (no padding mask), 5 tf32x3,
6 two bfloat16 parts (the 16-bit-input form), 7 two float16 parts (overflows above 65504: not usable).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_hadamard import _graph_inputs, _time_graph_ms  # noqa: E402
from utils import hadamard_triton as ht  # noqa: E402

MODES = {0: "split3", 1: "butterflies_only", 2: "fma_dot_f32", 3: "one_bf16_dot", 4: "split3_unmasked_2048",
         5: "tf32x3", 6: "split2_bf16", 7: "split2_fp16"}


@triton.jit
def _variant(x_ptr, out_ptr, factor_ptr, scale, M: tl.constexpr, M_PAD: tl.constexpr, P: tl.constexpr,
             LOG_P: tl.constexpr, RADIX: tl.constexpr, MODE: tl.constexpr, ROW_LEN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blocks = tl.arange(0, M_PAD)
    cols = tl.arange(0, P)
    mask = (blocks < M)[:, None]
    offsets = row * ROW_LEN + blocks[:, None] * P + cols[None, :]
    if MODE == 4:
        x = tl.load(x_ptr + offsets)
    else:
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    t = ht._sylvester_last_axis(x.to(tl.float32), M_PAD, P, LOG_P, RADIX)
    factor = tl.load(factor_ptr + blocks[:, None] * M_PAD + blocks[None, :])
    if MODE == 0 or MODE == 4:
        y = ht._split_dot(t, factor, False, 3, False)
    elif MODE == 1:
        y = t
    elif MODE == 2:
        y = tl.dot(factor.to(tl.float32), t, input_precision="ieee")
    elif MODE == 3:
        y = tl.dot(factor.to(tl.bfloat16), t.to(tl.bfloat16), out_dtype=tl.float32)
    elif MODE == 5:
        y = tl.dot(factor.to(tl.float32), t, input_precision="tf32x3")
    elif MODE == 6:
        y = ht._split_dot(t, factor, False, 2, False)
    else:
        s = factor.to(tl.float16)
        hi = t.to(tl.float16)
        mid = (t - hi.to(tl.float32)).to(tl.float16)
        y = tl.dot(s, hi, tl.dot(s, mid, out_dtype=tl.float32), out_dtype=tl.float32)
    y = y * scale
    if MODE == 4:
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--modes", default="0,1,3,6")
    parser.add_argument("--warps", default="1,2")
    parser.add_argument("--rows", default="65536")
    args = parser.parse_args()
    factor = ht._padded_factor(12, False, torch.device("cuda"))
    results = []
    for rows in map(int, args.rows.split(",")):
        for mode in map(int, args.modes.split(",")):
            row_len = 2048 if mode == 4 else 1536
            xs = [torch.randn(rows, row_len, device="cuda", dtype=torch.bfloat16)]
            xs += [xs[0].clone() for _ in range(_graph_inputs(xs[0].numel() * 2) - 1)]
            outs = [torch.empty_like(v) for v in xs]
            copy_ms = _time_graph_ms([functools.partial(lambda v, o: o.copy_(v), v, o) for v, o in zip(xs, outs)],
                                     20, 10)
            for warps in map(int, args.warps.split(",")):
                for radix in (5, 7):
                    def run(v, o, warps=warps, radix=radix, mode=mode, row_len=row_len):
                        _variant[(rows,)](v, o, factor, 1536**-0.5, M=12, M_PAD=16, P=128, LOG_P=7, RADIX=radix,
                                          MODE=mode, ROW_LEN=row_len, num_warps=warps)

                    ms = _time_graph_ms([functools.partial(run, v, o) for v, o in zip(xs, outs)], 20, 10)
                    results.append(dict(rows=rows, mode=MODES[mode], warps=warps, radix=radix, us=round(ms * 1e3, 2),
                                        of_copy=round(copy_ms / ms, 3)))
                    print(results[-1], flush=True)
            del xs, outs
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
