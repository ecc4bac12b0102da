"""Micro-benchmark of the online Hadamard: achieved memory bandwidth against a device-to-device copy.

    python benchmarks/bench_hadamard.py --out results/hadamard_bf16.json --dtypes bfloat16
    python benchmarks/bench_hadamard.py --out results/hadamard_sweep.json --sweep        # launch-config sweep
    python benchmarks/bench_hadamard.py --out results/hadamard_sm90.json --compile-only  # no GPU needed
    python benchmarks/bench_hadamard.py --out results/hadamard_graph.json --cuda-graph   # + kernel-only timings
    python benchmarks/bench_hadamard.py --out results/candidates.json --candidates       # autotuner diagnostics

For each dtype, row length n (powers of two 64..16384 and the model sizes 1536, 11008, 14336) and row count
(2^10..2^16), it times with ``triton.testing.do_bench`` (median, L2 flushed before every call):

* ``copy``: ``dst.copy_(src)`` of the same tensor, the bandwidth ceiling (one read + one write);
* ``triton``: ``hadamard_transform(x, backend="triton")`` (our kernel);
* ``torch``: ``hadamard_transform(x, backend="torch")`` (the PyTorch butterfly, the GPU path before this issue);
* ``dense``: ``x @ H`` with H in x's dtype (cuBLAS), skipped where it would take long (see ``--dense-max-flop``);
* ``fused``: ``hadamard_quantize(x, A4 spec, backend="triton")``, Hadamard + per-token asymmetric 4-bit
  quantize-dequantize (clip 0.9) in one kernel;
* ``unfused_triton``: the Triton transform then ``fake_quantize`` (PyTorch);
* ``unfused_torch``: the PyTorch transform then ``fake_quantize``: what the model ran before this issue.

Every method reads and writes the tensor once at best, so achieved GB/s = 2 * bytes / time and ``of_copy`` is that
over the copy's GB/s at the same size.

Two timing modes, every method timed the same way in each:

* eager (always; keys ``ms``, ``gbps``, ``of_copy``): one Python call per timed call, so a call whose host work
  (Python dispatch, Triton's launcher) outlasts do_bench's L2 flush shows that host time rather than its kernel's.
  ``--eager-repeats`` rounds (default 3) over all methods; each figure is the method's least median
  (``ms_each_round`` keeps them all): single rounds of small launches were seen 2-5x slow as a whole;
* ``--cuda-graph`` (keys ``graph_ms``, ``graph_gbps``, ``graph_of_copy``; ``summary_graph``): ``--graph-calls``
  back-to-back calls of the method captured in one CUDA graph, replayed ``--graph-reps`` times between CUDA events;
  per-call time = median replay time / calls. No host work is left, so this is the GPU's time per call (kernel
  bandwidth). The calls cycle over enough copies of the input (``graph_inputs``) that they span >= 128 MB, more
  than the L2 cache, so each call reads its input from memory as in the eager mode (outputs are allocated per
  call, as in the eager mode). ``summary`` gives, per dtype and method, the worst ``of_copy`` over
n <= 8192 at the largest row count (the issue's target: >= 0.7 for triton).

The Triton rows use the run-time autotuner (``SPINQUANT_TRITON_AUTOTUNE``, on by default): the first call per
(n, dtype, variant, row-count bucket) times a few launch layouts and keeps the fastest; ``launch_configs`` in the
JSON lists what it chose. 16-bit rows of 16..512 run the tensor-core path (``tl.dot`` against the +-1 Sylvester
matrix, see utils/hadamard_triton.py), everything else the butterflies; ``--sizes 64,128,256,512`` times just the
former. ``--sweep`` times a wider set of layouts (rows per program, num_warps, radix: the butterfly grouping, or on
the tensor-core path log2 of the first dot, i.e. the two-level split) around the default for each n (bf16, 2^14
rows), to refine the defaults. ``--compile-only`` compiles every kernel
specialisation the autotuner may launch for a GPU architecture (default sm_90) on any machine, and reports
registers, spills and shared memory per kernel.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from utils.hadamard import hadamard_matrix, hadamard_quantize, hadamard_transform  # noqa: E402
from utils.io import write_json  # noqa: E402
from utils.quant import QuantSpec, fake_quantize  # noqa: E402

DEFAULT_SIZES = (64, 128, 256, 512, 1024, 1536, 2048, 4096, 8192, 11008, 14336, 16384)
DEFAULT_ROWS = (2**10, 2**12, 2**14, 2**16)
METHODS = ("copy", "triton", "torch", "dense", "fused", "unfused_triton", "unfused_torch")
# The paper's A4 activation quantizer on down_proj's input (asymmetric per token) with a clip ratio.
A4 = QuantSpec(bits=4, asym=True, groupsize=-1, clip_ratio=0.9)
TARGET_N = 8192
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _methods(x: torch.Tensor, dense_ok: bool) -> dict:
    out = torch.empty_like(x)
    n = x.shape[-1]
    fns = {
        "copy": lambda: out.copy_(x),
        "triton": lambda: hadamard_transform(x, backend="triton"),
        "torch": lambda: hadamard_transform(x, backend="torch"),
        "fused": lambda: hadamard_quantize(x, A4, backend="triton"),
        "unfused_triton": lambda: fake_quantize(hadamard_transform(x, backend="triton"), A4),
        "unfused_torch": lambda: fake_quantize(hadamard_transform(x, backend="torch"), A4),
    }
    if dense_ok:
        h = hadamard_matrix(n, dtype=x.dtype, device=x.device)
        fns["dense"] = lambda: torch.matmul(x, h)
    return fns


def _time_ms(fn, warmup: int, rep: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


GRAPH_SPAN_BYTES = 128 * 2**20  # inputs cycled through in a graph: more than an H100/H200's L2 (50 / 60 MB)


def _graph_inputs(nbytes: int) -> int:
    """How many copies of the input the captured calls cycle through (>= GRAPH_SPAN_BYTES in all, at most 64)."""
    return max(1, min(64, -(-GRAPH_SPAN_BYTES // nbytes)))


def _time_graph_ms(fns: list, calls: int, reps: int) -> float:
    """Per-call GPU time of ``calls`` back-to-back calls captured in one CUDA graph (fns[i % len(fns)] for call
    i), replayed ``reps`` times between CUDA events: median replay time / calls."""
    import statistics

    for fn in fns:  # compile / autotune / allocate outside the capture (side stream, as torch.cuda.graph wants)
        fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns[:3]:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return float(statistics.median(times))


def run_benchmark(args, header: dict) -> dict:
    from utils import hadamard_triton

    device = torch.device("cuda")
    results = []
    started = time.time()
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for n in args.sizes:
            for rows in args.rows:
                x = torch.randn(rows, n, device=device, dtype=dtype)
                nbytes = x.numel() * x.element_size()
                dense_flop = 2.0 * rows * n * n
                dense_ok = dense_flop <= args.dense_max_flop * (0.25 if dtype == torch.float32 else 1.0)
                fns = _methods(x, dense_ok)
                row = {"dtype": dtype_name, "n": n, "rows": rows, "bytes": nbytes}
                copies = []
                if args.cuda_graph:
                    row["graph_inputs"] = _graph_inputs(nbytes)
                    row["graph_calls"] = args.graph_calls
                    copies = [fns] + [_methods(x.clone(), dense_ok) for _ in range(row["graph_inputs"] - 1)]
                eager = {method: [] for method in args.methods if method in fns}
                for _ in range(args.eager_repeats):  # rounds over all methods, so a slow spell hits each alike
                    for method in eager:
                        eager[method].append(_time_ms(fns[method], args.warmup_ms, args.rep_ms))
                for method in args.methods:
                    if method not in fns:
                        row[method] = {"skipped": f"dense x @ H needs {dense_flop:.2e} FLOP (--dense-max-flop)"}
                        continue
                    ms = min(eager[method])
                    row[method] = {"ms": round(ms, 5), "gbps": round(2 * nbytes / ms / 1e6, 1),
                                   "ms_each_round": [round(t, 5) for t in eager[method]]}
                    if args.cuda_graph:
                        try:
                            graph_ms = _time_graph_ms([c[method] for c in copies], args.graph_calls, args.graph_reps)
                        except Exception as err:  # e.g. a method that synchronises cannot be captured
                            torch.cuda.synchronize()
                            row[method]["graph_error"] = f"{type(err).__name__}: {err}"[:200]
                        else:
                            row[method]["graph_ms"] = round(graph_ms, 5)
                            row[method]["graph_gbps"] = round(2 * nbytes / graph_ms / 1e6, 1)
                for prefix in ("", "graph_"):
                    copy = row.get("copy", {}).get(prefix + "gbps")
                    for method in args.methods:
                        if copy and prefix + "gbps" in row[method]:
                            row[method][prefix + "of_copy"] = round(row[method][prefix + "gbps"] / copy, 3)
                results.append(row)
                # Rows so far, so a run cut short (a time limit) still leaves its measurements; completed below.
                write_json(args.out, {**header, "partial": True, "results": results})
                print(_format_row(row, args.methods), flush=True)
                if args.cuda_graph:
                    print(_format_row(row, args.methods, "graph_"), flush=True)
                del x, fns, copies
            torch.cuda.empty_cache()
    graph = {"summary_graph": _summary(results, args, "graph_")} if args.cuda_graph else {}
    return {
        "results": results,
        "timing_modes": {
            "eager": "ms/gbps/of_copy: the least of --eager-repeats triton.testing.do_bench medians (rounds over "
                     "all methods; ms_each_round), one Python call per call, L2 flushed",
            **({"graph": "graph_ms/graph_gbps/graph_of_copy: CUDA graph of graph_calls back-to-back calls over "
                         "graph_inputs input copies (>= 128 MB), median replay / calls: GPU time only"}
               if args.cuda_graph else {}),
        },
        "summary": _summary(results, args),
        **graph,
        "autotune": hadamard_triton.autotune_enabled(),
        "launch_configs": hadamard_triton.tuned_configs(),  # n/dtype/variant/round/rows-bucket -> rows, warps, radix
        "seconds": round(time.time() - started, 1),
    }


def _format_row(row: dict, methods, prefix: str = "") -> str:
    mode = "graph" if prefix else "eager"
    parts = [f"{row['dtype']:>8} n={row['n']:>5} rows={row['rows']:>6} {mode}"]
    for method in methods:
        entry = row[method]
        if prefix + "gbps" in entry:
            share = entry.get(prefix + "of_copy")
            share = f" ({share:.2f})" if share is not None and method != "copy" else ""
            parts.append(f"{method} {entry[prefix + 'gbps']:7.0f}{share}")
    return " | ".join(parts) + "  GB/s"


def _summary(results: list[dict], args, prefix: str = "") -> dict:
    """Worst fraction of copy bandwidth over n <= 8192 at the largest row count, per dtype and method (eager
    timings, or with prefix "graph_" the CUDA-graph ones)."""
    summary = {}
    largest = max(args.rows)
    for dtype_name in args.dtypes:
        rows = [r for r in results if r["dtype"] == dtype_name and r["rows"] == largest and r["n"] <= TARGET_N]
        per_method = {}
        for method in args.methods:
            shares = [(r[method][prefix + "of_copy"], r["n"]) for r in rows if prefix + "of_copy" in r[method]]
            if shares and method != "copy":
                worst, worst_n = min(shares)
                per_method[method] = {"worst_of_copy": worst, "at_n": worst_n}
        summary[dtype_name] = {"rows": largest, "n_max": TARGET_N, **per_method}
        if "triton" in per_method:
            summary[dtype_name]["triton_meets_70_percent"] = per_method["triton"]["worst_of_copy"] >= 0.7
    return summary


def run_sweep(args) -> dict:
    """Time (rows per program, num_warps, radix) around the default for each n (bf16, --sweep-rows rows): wider
    than the run-time autotuner's candidates, to refine utils.hadamard_triton.launch_config / candidate_configs."""
    from utils import hadamard_triton

    rows_total = args.sweep_rows
    results = []
    for n in args.sizes:
        x = torch.randn(rows_total, n, device="cuda", dtype=torch.bfloat16)
        copy_ms = _time_ms(lambda: torch.empty_like(x).copy_(x), args.warmup_ms, args.rep_ms)
        base = hadamard_triton.launch_config(n, rows_total, torch.bfloat16)
        power_of_two = n & (n - 1) == 0
        spaces = []
        if hadamard_triton._dot_capable(n, torch.bfloat16):
            # tensor-core path: rows per program, warps and the dot size / split (radix = log2 of the first dot)
            dot_base = hadamard_triton.launch_config(n, rows_total, torch.bfloat16, dot=True)
            rows_dot = sorted({max(16, dot_base.rows // 2), dot_base.rows, dot_base.rows * 2, dot_base.rows * 4})
            spaces.append((True, rows_dot, [4, 8], hadamard_triton._dot_options(n)))
        bfly = hadamard_triton.launch_config(n, rows_total, torch.bfloat16, dot=False)
        rows_bfly = sorted({bfly.rows, bfly.rows * 2}) if power_of_two and n < 2048 else [bfly.rows]
        warps_bfly = sorted({max(1, bfly.num_warps // 4), max(1, bfly.num_warps // 2), bfly.num_warps,
                             min(16, bfly.num_warps * 2)})
        log_p = hadamard_triton._plan(n).p.bit_length() - 1
        radices = sorted({r for r in (1, 3, 5, 7) if r < log_p} | {log_p})  # log_p: every stage in one group
        spaces.append((False, rows_bfly, warps_bfly, radices))
        if hadamard_triton._factor_last_capable(n):  # m x 2^k with a small factor: the factor-last order too
            spaces.append((True, [1], warps_bfly, radices))
        graph_xs = [x] + [x.clone() for _ in range(_graph_inputs(x.numel() * 2) - 1)] if args.cuda_graph else []
        graph_copy_ms = None
        if args.cuda_graph:
            graph_copy_ms = _time_graph_ms(
                [functools.partial(lambda v: torch.empty_like(v).copy_(v), v) for v in graph_xs],
                args.graph_calls, args.graph_reps,
            )
        timings = []
        for dot, row_options, warp_options, radix_options in spaces:
            for per_program, warps, radix in itertools.product(row_options, warp_options, radix_options):
                config = hadamard_triton.LaunchConfig(per_program, warps, radix, dot)
                run = functools.partial(hadamard_triton.launch, x, config=config)
                try:
                    ms = _time_ms(run, args.warmup_ms, args.rep_ms)
                    timing = {"config": list(config), "ms": round(ms, 5), "of_copy": round(copy_ms / ms, 3)}
                    if args.cuda_graph:
                        runs = [functools.partial(hadamard_triton.launch, v, config=config) for v in graph_xs]
                        graph_ms = _time_graph_ms(runs, args.graph_calls, args.graph_reps)
                        timing.update(graph_ms=round(graph_ms, 5), graph_of_copy=round(graph_copy_ms / graph_ms, 3))
                except Exception as err:  # e.g. out of shared memory or registers for an extreme config
                    timings.append({"config": list(config), "error": f"{type(err).__name__}: {err}"[:200]})
                    continue
                timings.append(timing)
        best = min((t for t in timings if "ms" in t), key=lambda t: t["ms"])
        entry = {"n": n, "rows": rows_total, "default": list(base), "best": best, "all": timings}
        line = f"n={n:>5}: default {entry['default']}, best eager {best['config']} at {best['of_copy']:.2f} of copy"
        if args.cuda_graph:
            entry["best_graph"] = min((t for t in timings if "graph_ms" in t), key=lambda t: t["graph_ms"])
            line += f"; best graph {entry['best_graph']['config']} at {entry['best_graph']['graph_of_copy']:.2f}"
        results.append(entry)
        print(line, flush=True)
        del x
    return {"sweep": results}


def run_candidates(args) -> dict:
    """Time every autotuner candidate for each (n, rows) three times over, interleaved, the way the autotuner times
    them (do_bench, L2 flushed, its warm-up and measuring times) and as GPU time in a CUDA graph: shows whether the
    autotuner's pick is stable and whether its eager timings agree with the kernel time."""
    from utils import hadamard_triton

    results = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for n in args.sizes:
            for rows in args.rows:
                x = torch.randn(rows, n, device="cuda", dtype=dtype)
                out = torch.empty_like(x)
                graph_xs = [x] + [x.clone() for _ in range(_graph_inputs(x.numel() * x.element_size()) - 1)]
                configs = hadamard_triton.candidate_configs(n, rows, dtype)
                eager = {config: [] for config in configs}
                for _ in range(3):
                    for config in configs:
                        run = functools.partial(hadamard_triton._run, x, out, config=config)
                        eager[config].append(_time_ms(run, hadamard_triton.AUTOTUNE_WARMUP_MS,
                                                      hadamard_triton.AUTOTUNE_REP_MS))
                timings = []
                for config in configs:
                    runs = [functools.partial(hadamard_triton.launch, v, config=config) for v in graph_xs]
                    graph_ms = _time_graph_ms(runs, args.graph_calls, args.graph_reps)
                    timings.append({"config": list(config), "eager_us": [round(1e3 * t, 2) for t in eager[config]],
                                    "graph_us": round(1e3 * graph_ms, 2)})
                entry = {"dtype": dtype_name, "n": n, "rows": rows, "default": list(configs[0]), "candidates": timings,
                         "best_eager_each_round": [min(timings, key=lambda t: t["eager_us"][i])["config"]
                                                   for i in range(3)],
                         "best_graph": min(timings, key=lambda t: t["graph_us"])["config"]}
                results.append(entry)
                print(f"{dtype_name} n={n} rows={rows}: default {entry['default']}", flush=True)
                for t in timings:
                    print(f"    {t['config']}: eager {t['eager_us']} us, graph {t['graph_us']} us", flush=True)
                del x, out, graph_xs
    return {"candidates": results}


def _path_name(meta: dict) -> str:
    if not meta["DOT"]:
        return "butterfly" if meta["M"] == 1 else "factor-dot+butterfly"
    if meta["CHUNKS"] > 1:
        return f"dot-chunked-{meta['CHUNKS']}x{meta['DOT']}"
    return f"dot-{meta['DOT']}" if meta["DOT"] == meta["P"] else f"dot-two-level-{meta['P'] // meta['DOT']}x{meta['DOT']}"


def _ptx_digest(ptx: str) -> str:
    """SHA-1 of the PTX's instructions as a sorted multiset, without source locations, debug sections, labels and
    register numbers: equal digests mean a refactor of the kernel's Python changed no instruction (only, at most,
    their order in the PTX, which ptxas schedules anyway)."""
    import hashlib

    code = ptx.split("\n\t.section\t.debug", 1)[0]
    kept = []
    for line in code.splitlines():
        line = line.split("//", 1)[0].strip()
        if not line or line.startswith((".loc", ".file", "$L__")):
            continue
        kept.append(re.sub(r"\$L__\w+", "$L", re.sub(r"%(r|rd|f|fd|p|rs|h|hh)\d+", r"%\1", line)))
    return hashlib.sha1("\n".join(sorted(kept)).encode()).hexdigest()


def compile_only(args) -> dict:
    """Compile each specialisation for GPUTarget("cuda", arch) and report resources; runs without a GPU."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    from utils import hadamard_triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    pointer_types = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int8: "*i8"}
    kernel = hadamard_triton._hadamard_kernel
    results = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for n in args.sizes:
            x = torch.empty(max(args.rows), n, dtype=dtype, device="meta")
            configs = hadamard_triton.candidate_configs(n, max(args.rows), dtype)
            for variant, spec, config in [(v, q, c) for v, q in (("transform", None), ("fused", A4)) for c in configs]:
                grid, values, meta = hadamard_triton.kernel_arguments(x, torch.empty_like(x), spec=spec, config=config)
                meta["RECIPROCAL"] = meta["QUANTIZE"]  # what a CUDA tensor gets (x is on the meta device here)
                signature, constants, attrs = {}, {}, {}
                for index, (name, value) in enumerate(zip(kernel.arg_names, values)):
                    if isinstance(value, torch.Tensor):
                        signature[name] = pointer_types[value.dtype]
                        attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
                        continue
                    kind, key = native_specialize_impl(BaseBackend, value, False, name != "n_rows", True)
                    if kind == "constexpr":
                        signature[name], constants[name] = "constexpr", key
                    else:
                        signature[name] = kind
                        if key == "D":
                            attrs[(index,)] = [["tt.divisibility", 16]]
                options = {name: meta.pop(name) for name in ("num_warps", "enable_fp_fusion")}
                num_warps = options["num_warps"]
                for name, value in meta.items():
                    signature[name], constants[name] = "constexpr", value
                start = time.time()
                compiled = triton.compile(
                    ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", args.arch, 32), options=options
                )
                seconds = time.time() - start
                cubin = Path(args.out).with_suffix(".tmp.cubin")
                cubin.write_bytes(compiled.asm["cubin"])
                usage = subprocess.run(
                    [str(tools / "cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True, text=True
                ).stdout
                cubin.unlink()
                registers = int(re.search(r"REG:(\d+)", usage).group(1))
                spilled = int(re.search(r"LOCAL:(\d+)", usage).group(1))
                entry = {
                    "dtype": dtype_name, "n": n, "variant": variant, "path": _path_name(meta),
                    "rows_per_program": meta["ROWS"],
                    "num_warps": num_warps, "radix": meta["RADIX"], "registers": registers, "local_bytes": spilled,
                    "shared_bytes": compiled.metadata.shared, "compile_s": round(seconds, 2),
                    "ptx_sha1": _ptx_digest(compiled.asm["ptx"]),
                }
                results.append(entry)
                print(entry, flush=True)
    return {"compile_only": results, "arch": args.arch}


# Runs of benchmarks/run_issue5_h100.sh's e2e part: (suite name, index) -> label.
E2E_RUNS = {
    ("torch", 0): "no_rotation",
    ("torch", 1): "rotate_no_online_had_a",
    ("torch", 2): "online_had_torch",
    ("triton", 0): "online_had_triton_a",
    ("triton", 1): "rotate_no_online_had_b",
    ("triton", 2): "online_had_triton_b",
}


def e2e_summary(folder: Path) -> dict:
    """Eval wall time per configuration of the end-to-end PTQ runs, and the online-Hadamard overhead per backend
    (relative to the same rotated model without online Hadamards; best of the repeated runs)."""
    runs = {}
    for (backend, index), label in E2E_RUNS.items():
        path = folder / f"issue5_e2e_{backend}-{index}.json"
        if not path.is_file():
            runs[label] = {"missing": str(path)}
            continue
        result = json.loads(path.read_text())
        runs[label] = {
            "backend_env": backend,
            "rotate": result["config"]["rotate"],
            "online_hadamard": result["config"].get("online_hadamard"),
            "eval_ppl_s": result["timings"]["eval_ppl"],
            "total_s": result["timings"]["total"],
            "wiki2_ppl": result["wiki2_ppl"],
        }

    def best(*labels: str) -> float | None:
        times = [runs[label]["eval_ppl_s"] for label in labels if "eval_ppl_s" in runs[label]]
        return min(times) if times else None

    base = best("rotate_no_online_had_a", "rotate_no_online_had_b")
    on_torch = best("online_had_torch")
    on_triton = best("online_had_triton_a", "online_had_triton_b")
    return {
        "e2e_runs": runs,
        "eval_s_rotation_without_online_hadamard": base,
        "eval_s_online_hadamard_torch": on_torch,
        "eval_s_online_hadamard_triton": on_triton,
        "online_hadamard_overhead_torch": round(on_torch / base - 1, 4) if base and on_torch else None,
        "online_hadamard_overhead_triton": round(on_triton / base - 1, 4) if base and on_triton else None,
        "eval_speedup_triton_over_torch": round(on_torch / on_triton, 3) if on_torch and on_triton else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON result path")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated: bfloat16,float16,float32")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="comma-separated row lengths n")
    parser.add_argument("--rows", default=",".join(map(str, DEFAULT_ROWS)), help="comma-separated row counts")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--warmup-ms", type=int, default=10, help="do_bench warm-up time per measurement")
    parser.add_argument("--rep-ms", type=int, default=40, help="do_bench measuring time per measurement")
    parser.add_argument(
        "--eager-repeats", type=int, default=3,
        help="eager rounds over all methods; each method's figure is its least median (a round can be slowed as a "
             "whole: on an H200, 0.2-0.5 of copy for a kernel whose other rounds and CUDA-graph time gave 0.9)",
    )
    parser.add_argument(
        "--dense-max-flop", type=float, default=2.0**42, help="skip dense x @ H above this many FLOP (fp32: / 4)"
    )
    parser.add_argument("--sweep", action="store_true", help="sweep launch configs instead (bf16)")
    parser.add_argument(
        "--candidates", action="store_true", help="time the autotuner's candidates three times each (diagnostics)"
    )
    parser.add_argument("--sweep-rows", type=int, default=2**14, help="row count of the sweep")
    parser.add_argument("--compile-only", action="store_true", help="compile for --arch and report resources")
    parser.add_argument(
        "--cuda-graph", action="store_true",
        help="also time every method inside a CUDA graph (GPU time per call, no host overhead): graph_* keys",
    )
    parser.add_argument("--graph-calls", type=int, default=20, help="calls captured per CUDA graph")
    parser.add_argument("--graph-reps", type=int, default=10, help="timed replays of each CUDA graph")
    parser.add_argument("--arch", type=int, default=90, help="compute capability for --compile-only (90 = H100)")
    parser.add_argument(
        "--e2e-summary", type=Path, default=None, metavar="DIR", help="summarise run_issue5_h100.sh's e2e runs in DIR"
    )
    args = parser.parse_args(argv)
    if args.e2e_summary is not None:
        if not args.e2e_summary.is_dir():
            parser.error(f"--e2e-summary: no folder {args.e2e_summary}")
        summary = e2e_summary(args.e2e_summary)
        print(json.dumps(summary, indent=1))
        write_json(args.out, summary)
        return 0
    try:
        args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        unknown = [d for d in args.dtypes if d not in DTYPES]
        if unknown:
            raise ValueError(f"--dtypes: unknown {unknown}; valid: {', '.join(DTYPES)}")
        args.sizes = [int(v) for v in args.sizes.split(",")]
        args.rows = [int(v) for v in args.rows.split(",")]
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in args.methods if m not in METHODS]
        if bad:
            raise ValueError(f"--methods: unknown {bad}; valid: {', '.join(METHODS)}")
        if "copy" not in args.methods:
            args.methods.insert(0, "copy")  # every fraction is relative to it
    except ValueError as err:
        parser.error(str(err))

    import triton

    header = {
        "benchmark": "hadamard",
        "argv": sys.argv[1:],
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    if args.compile_only:
        result = compile_only(args)
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: use --compile-only on a machine without a GPU")
        header["device"] = torch.cuda.get_device_name()
        header["copy_note"] = "GB/s = 2 * tensor bytes / median time (one read + one write); L2 flushed per call"
        result = run_sweep(args) if args.sweep else run_candidates(args) if args.candidates else run_benchmark(args, header)
    path = write_json(args.out, {**header, **result})
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
