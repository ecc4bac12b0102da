"""Experiment driver: the paper's result grid and its random-rotation study on one model, resumable.

    python -m spinquant.experiments --grid paper --out outputs/experiments/smollm2      # Table 1/2 layout
    python -m spinquant.experiments --grid random --out outputs/experiments/smollm2     # Figure: ppl spread
    python -m spinquant.experiments --grid all --tasks --out ...                        # + zero-shot column

The paper grid is {FP, RTN, QuaRot, SpinQuant no_had, SpinQuant had} x {W4A16KV16, W4A8KV16, W4A8KV8, W4A4KV16,
W4A4KV4} x weight quantizer {RTN, GPTQ} (FP once, at 16 bits):

* RTN: no rotation (with the GPTQ weight quantizer this is the paper's "GPTQ" row);
* QuaRot: random Hadamard R1/R2 and the online Hadamards R3/R4, nothing learned;
* SpinQuant no_had / had: learned R1/R2 (``scripts/10_optimize_rotation.sh --variant no_had|had``), without / with
  the online R3/R4. The paper learns one rotation per bit setting, at the weight bits of the cell for RTN and at 16
  weight bits for GPTQ (``--rotation_policy per_cell``); ``--rotation_policy shared`` learns one rotation per variant
  and weight quantizer at ``--shared_rotation_bits`` (default W4A4KV4, i.e. W16A4KV4 for GPTQ) and uses it in every
  column: 4 learning runs instead of 18. A learning setting with no quantization at all (W16A16KV16) has a
  rotation-invariant loss, so there the weight bits of the cell are used even for GPTQ.

The random grid evaluates ``--random_seeds`` random orthogonal and random Hadamard rotations (QuaRot-style, with R3/R4)
and ``--learned_seeds`` learned rotations (variant had) at ``--random_bits`` with RTN weights.

Every cell is one in-process :func:`spinquant.ptq.run_ptq` (sharing the loaded model, the tokenized data and, across
the columns of a row, the quantized weights) whose JSON lands in ``OUT/cells/<cell>.json``; learning runs are
subprocesses of the user-facing script (so they use every GPU) under ``OUT/rotations/<job>/``. A finished cell or
rotation is skipped on the next run, so an interrupted grid resumes where it stopped. The tables are written to
``OUT/table.md`` (the paper's layout) and ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from tqdm.auto import tqdm

from utils.args import parse_ptq_args
from utils.io import atomic_write, setup_logging, write_json

logger = logging.getLogger("spinquant.experiments")

__all__ = [
    "Bits",
    "Cell",
    "RotationJob",
    "METHODS",
    "PAPER_BITS",
    "paper_grid",
    "random_grid",
    "rotation_job_for",
    "ptq_argv",
    "run_experiments",
    "render_table",
    "collect_rows",
    "write_report",
    "cell_from_dict",
    "main",
]

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fp", "rtn", "quarot", "spinquant_no_had", "spinquant_had")
METHOD_TITLES = {
    "fp": "FP",
    "rtn": "RTN (no rotation)",
    "quarot": "QuaRot (random Hadamard R1-R4)",
    "spinquant_no_had": "SpinQuant no_had (learned R1, R2)",
    "spinquant_had": "SpinQuant had (learned R1, R2 + R3, R4)",
}
PAPER_BITS = ("W4A16KV16", "W4A8KV16", "W4A8KV8", "W4A4KV16", "W4A4KV4")
WEIGHT_QUANTIZERS = ("rtn", "gptq")
RANDOM_GROUPS = ("random_orthogonal", "random_hadamard", "learned")
# The paper's scripts/2_eval_ptq.sh defaults (K/V groups of 128 become one group per head on smaller heads).
PAPER_PTQ_FLAGS = (
    "--w_clip --a_asym --k_asym --v_asym --k_groupsize 128 --v_groupsize 128 --bf16 True --fp16 False "
    "--per_device_eval_batch_size 4"
)


@dataclass(frozen=True, order=True)
class Bits:
    """A bit setting as the paper writes it: weights, activations, KV cache (16 = not quantized)."""

    w: int
    a: int
    kv: int

    @classmethod
    def parse(cls, text: str) -> "Bits":
        match = re.fullmatch(r"W(\d+)A(\d+)KV(\d+)", text.strip().upper())
        if not match:
            raise ValueError(f"bit setting {text!r} is not of the form W4A8KV8")
        return cls(*(int(v) for v in match.groups()))

    def __str__(self) -> str:
        return f"W{self.w}A{self.a}KV{self.kv}"

    @property
    def paper(self) -> str:
        return f"{self.w}-{self.a}-{self.kv}"


FP_BITS = Bits(16, 16, 16)


@dataclass(frozen=True)
class RotationJob:
    """One learning run: a variant at a bit setting, seeded."""

    variant: str
    bits: Bits
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.variant}-{self.bits}-seed{self.seed}"


@dataclass(frozen=True)
class Cell:
    """One evaluated configuration: a method at a bit setting with a weight quantizer (None at 16 weight bits)."""

    method: str
    bits: Bits
    weight_quantizer: str | None = None
    rotate_mode: str = "hadamard"  # random R1/R2 kind (QuaRot / random grid)
    seed: int = 0
    label: str | None = None  # the random grid's group
    rotation: RotationJob | None = None  # learned R1/R2 (SpinQuant methods)

    @property
    def name(self) -> str:
        if self.label:
            return f"{self.label}-{self.bits}-seed{self.seed}"
        parts = [self.method, str(self.bits)] + ([self.weight_quantizer] if self.weight_quantizer else [])
        return "-".join(parts)


def rotation_job_for(method: str, bits: Bits, weight_quantizer: str, policy: str, shared_bits: Bits,
                     seed: int = 0) -> RotationJob:
    """The learned rotation a SpinQuant cell uses (see the module docstring for the two policies)."""
    variant = "had" if method == "spinquant_had" else "no_had"
    learn = bits if policy == "per_cell" else Bits(bits.w, shared_bits.a, shared_bits.kv)
    if policy not in ("per_cell", "shared"):
        raise ValueError(f"--rotation_policy must be per_cell or shared, got {policy!r}")
    if weight_quantizer == "gptq" and (learn.a < 16 or learn.kv < 16):
        learn = Bits(16, learn.a, learn.kv)  # the paper: learn without weight quantization, then GPTQ
    return RotationJob(variant, learn, seed)


def paper_grid(bits: Iterable[str] = PAPER_BITS, methods: Iterable[str] = METHODS,
               weight_quantizers: Iterable[str] = WEIGHT_QUANTIZERS, rotation_policy: str = "per_cell",
               shared_bits: str = "W4A4KV4", seed: int = 0) -> list[Cell]:
    """The cells of the paper's table, FP first, then by bit setting, method and weight quantizer."""
    methods = list(methods)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    weight_quantizers = list(weight_quantizers)
    if set(weight_quantizers) - set(WEIGHT_QUANTIZERS):
        raise ValueError(f"--weight_quantizers: choose from {list(WEIGHT_QUANTIZERS)}, got {weight_quantizers}")
    shared = Bits.parse(shared_bits)
    cells = [Cell("fp", FP_BITS)] if "fp" in methods else []
    for setting in map(Bits.parse, bits):
        for method in methods:
            if method == "fp":
                continue
            for quantizer in weight_quantizers if setting.w < 16 else [None]:
                rotation = None
                if method.startswith("spinquant"):
                    rotation = rotation_job_for(method, setting, quantizer or "rtn", rotation_policy, shared, seed)
                cells.append(Cell(method, setting, quantizer, seed=seed, rotation=rotation))
    return cells


def random_grid(bits: str = "W4A4KV4", random_seeds: int = 10, learned_seeds: int = 1) -> list[Cell]:
    """W4A4KV4 (by default) RTN perplexity over random orthogonal, random Hadamard and learned rotations."""
    setting = Bits.parse(bits)
    cells = []
    for seed in range(random_seeds):
        cells.append(Cell("quarot", setting, "rtn", rotate_mode="random", seed=seed, label="random_orthogonal"))
        cells.append(Cell("quarot", setting, "rtn", rotate_mode="hadamard", seed=seed, label="random_hadamard"))
    for seed in range(learned_seeds):
        job = RotationJob("had", setting, seed)
        cells.append(Cell("spinquant_had", setting, "rtn", seed=seed, label="learned", rotation=job))
    return cells


def ptq_argv(cell: Cell, model: str, result_json: Path, rotation_path: Path | None, common: Sequence[str]) -> list[str]:
    """The spinquant-ptq command line of a cell (what a user would type to reproduce it)."""
    argv = ["--input_model", model, *common]
    argv += ["--w_bits", str(cell.bits.w), "--a_bits", str(cell.bits.a),
             "--k_bits", str(cell.bits.kv), "--v_bits", str(cell.bits.kv), "--seed", str(cell.seed)]
    if cell.weight_quantizer == "rtn":
        argv.append("--w_rtn")
    if cell.method == "quarot":
        argv += ["--rotate", "--rotate_mode", cell.rotate_mode, "--variant", "had"]
    elif cell.method.startswith("spinquant"):
        if rotation_path is None:
            raise ValueError(f"cell {cell.name} needs a learned rotation")
        variant = "had" if cell.method == "spinquant_had" else "no_had"
        argv += ["--rotate", "--variant", variant, "--optimized_rotation_path", str(rotation_path)]
    argv += ["--result_json", str(result_json), "--no_progress"]
    return argv


def _finished(path: Path, need_zeroshot: bool) -> dict | None:
    """The cell's result if it exists, is readable and has what this run asks for."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if result.get("wiki2_ppl") is None or (need_zeroshot and result.get("zeroshot_avg") is None):
        return None
    return result


def learn_rotation(job: RotationJob, model: str, folder: Path, data_dir: str | None, calib_split: str | None,
                   learn_args: Sequence[str]) -> Path:
    """Run ``scripts/10_optimize_rotation.sh`` for ``job`` unless its R.bin is there; returns the R.bin path."""
    rotation_path = folder / "R.bin"
    summary = folder / "optimize_rotation.json"
    if rotation_path.is_file() and summary.is_file():
        return rotation_path
    folder.mkdir(parents=True, exist_ok=True)
    bits = job.bits
    command = [
        "bash", str(ROOT / "scripts" / "10_optimize_rotation.sh"), model, str(bits.w), str(bits.a), str(bits.kv),
        "--variant", job.variant, "--seed", str(job.seed), "--output_dir", str(folder), "--logging_dir", str(folder),
        "--output_rotation_path", str(rotation_path), "--result_json", str(summary), "--no_progress",
        *(["--data_dir", data_dir] if data_dir else []),
        *(["--calib_split", calib_split] if calib_split else []),
        *learn_args,
    ]
    env = dict(os.environ, PYTHON=sys.executable)
    logger.info("learning rotation %s: %s", job.name, shlex.join(command))
    start = time.perf_counter()
    with open(folder / "learn.log", "w") as log:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not rotation_path.is_file():
        tail = (folder / "learn.log").read_text()[-2000:]
        raise RuntimeError(f"learning rotation {job.name} failed (exit {done.returncode}); log {folder}/learn.log:\n"
                           f"{tail}")
    logger.info("rotation %s learned in %.1f s", job.name, time.perf_counter() - start)
    return rotation_path


def cell_from_dict(record: dict) -> Cell:
    """The inverse of ``dataclasses.asdict(cell)`` (as stored under ``experiment.cell`` in each cell's JSON)."""
    rotation = record.get("rotation")
    if rotation:
        rotation = RotationJob(rotation["variant"], Bits(**rotation["bits"]), rotation.get("seed", 0))
    fields = {k: v for k, v in record.items() if k not in ("bits", "rotation")}
    return Cell(bits=Bits(**record["bits"]), rotation=rotation, **fields)


def collect_rows(out: Path) -> list[dict]:
    """A summary row for every finished cell under ``out/cells`` (whichever grid produced it)."""
    rows = []
    for path in sorted((out / "cells").glob("*.json")):
        try:
            result = json.loads(path.read_text())
            cell = cell_from_dict(result["experiment"]["cell"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("skipping %s: not a cell result (%s)", path, err)
            continue
        if result.get("wiki2_ppl") is not None:
            rows.append(_summary_row(cell, result, path))
    return rows


def write_report(out: Path, model: str, figures: bool = False) -> tuple[list[dict], dict[str, str]]:
    """``out/table.md`` and ``out/results.json`` from every finished cell; with ``figures`` the perplexity
    distribution over rotations and the learning loss curves under ``out/figures``."""
    rows = collect_rows(out)
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(render_table(rows, model)))
    made = {}
    if figures:
        from eval_utils.figures import plot_loss_curves, plot_ppl_distribution

        labelled = [json.loads(Path(row["result_json"]).read_text()) for row in rows if row.get("label")]
        if labelled:
            made["ppl_distribution"] = str(out / "figures" / "ppl_distribution.png")
            bits = next(row["bits"] for row in rows if row.get("label"))
            plot_ppl_distribution(labelled, made["ppl_distribution"], group_by="label",
                                  title=f"{model}: {bits} RTN perplexity over rotations")
        logs = sorted((out / "rotations").glob("*/train_log.jsonl"))
        if logs:
            made["loss_curves"] = str(out / "figures" / "loss_curves.png")
            plot_loss_curves(logs, made["loss_curves"], labels=[log.parent.name for log in logs],
                             title=f"{model}: rotation learning (Cayley SGD)")
    return rows, made


def _summary_row(cell: Cell, result: dict, path: Path) -> dict:
    return {
        "cell": cell.name,
        "method": cell.method,
        "bits": str(cell.bits),
        "weight_quantizer": cell.weight_quantizer,
        "label": cell.label,
        "seed": cell.seed,
        "rotation": cell.rotation.name if cell.rotation else None,
        "wiki2_ppl": result.get("wiki2_ppl"),
        "zeroshot_avg": result.get("zeroshot_avg"),
        "zeroshot": {k: v for k, v in (result.get("zeroshot") or {}).items() if k in ("tasks", "accuracy")} or None,
        "eval_s": (result.get("timings") or {}).get("eval_ppl"),
        "result_json": str(path),
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:.3g}" if value < 1e5 else f"{value:.1e}"
    return f"{value:.{digits}f}"


def render_table(rows: Sequence[dict], model: str) -> str:
    """The paper's layout (Table 1/2): a block per bit setting, a line per method and weight quantizer."""
    with_zeroshot = any(row.get("zeroshot_avg") is not None for row in rows)
    grid = [row for row in rows if not row.get("label")]
    lines = [f"### {model}: WikiText-2 perplexity" + (" and zero-shot average" if with_zeroshot else ""), ""]
    header = "| #Bits (W-A-KV) | Method | Weights | Wiki2 ppl |" + (" 0-shot avg (%) |" if with_zeroshot else "")
    lines += [header, "|---|---|---|---|" + ("---|" if with_zeroshot else "")]
    order = {m: i for i, m in enumerate(METHODS)}
    settings = sorted({row["bits"] for row in grid}, key=lambda b: (Bits.parse(b) != FP_BITS, PAPER_BITS.index(b)
                                                                     if b in PAPER_BITS else 99, b))
    for setting in settings:
        block = sorted((r for r in grid if r["bits"] == setting),
                       key=lambda r: (order.get(r["method"], 99), ("rtn", "gptq").index(r["weight_quantizer"])
                                      if r["weight_quantizer"] in ("rtn", "gptq") else -1))
        for row in block:
            zs = row.get("zeroshot_avg")
            line = (f"| {Bits.parse(setting).paper} | {METHOD_TITLES.get(row['method'], row['method'])} | "
                    f"{(row['weight_quantizer'] or '-').upper()} | {_fmt(row['wiki2_ppl'])} |")
            if with_zeroshot:
                line += f" {_fmt(100 * zs) if zs is not None else '-'} |"
            lines.append(line)
    random_rows = [row for row in rows if row.get("label")]
    if random_rows:
        lines += ["", f"### {model}: perplexity over rotations ({random_rows[0]['bits']}, RTN weights)", "",
                  "| rotation | runs | min | median | max |", "|---|---|---|---|---|"]
        for group in RANDOM_GROUPS:
            values = sorted(r["wiki2_ppl"] for r in random_rows if r["label"] == group and r["wiki2_ppl"] is not None)
            if values:
                lines.append(f"| {group} | {len(values)} | {_fmt(values[0])} | {_fmt(statistics.median(values))} | "
                             f"{_fmt(values[-1])} |")
    return "\n".join(lines) + "\n"


def run_experiments(cells: Sequence[Cell], model: str, out: Path, common: Sequence[str] = (),
                    data_dir: str | None = None, calib_split: str | None = None, learn_args: Sequence[str] = (),
                    zeroshot_args: Sequence[str] = (), max_cells: int | None = None,
                    figures: bool = False) -> list[dict]:
    """Learn missing rotations, evaluate missing cells, write the tables; returns one summary row per cell."""
    from .ptq import PTQCache, run_ptq

    out.mkdir(parents=True, exist_ok=True)
    cache = PTQCache()
    need_zeroshot = bool(zeroshot_args)
    common = [*common, *(["--data_dir", data_dir] if data_dir else []),
              *(["--calib_split", calib_split] if calib_split else []), *zeroshot_args]
    rows, failures, done_now = [], [], 0
    # Cells sharing rotation and weights run back to back so the cache reuses their quantized weights.
    order = sorted(range(len(cells)), key=lambda i: (cells[i].label or "", cells[i].method,
                                                     cells[i].rotation.name if cells[i].rotation else "",
                                                     cells[i].rotate_mode, cells[i].seed,
                                                     cells[i].weight_quantizer or "", i))
    results: dict[int, dict] = {}
    progress = tqdm(order, desc="experiment cells", unit="cell")
    for index in progress:
        cell = cells[index]
        path = out / "cells" / f"{cell.name}.json"
        result = _finished(path, need_zeroshot)
        if result is None:
            if max_cells is not None and done_now >= max_cells:
                continue
            progress.set_postfix_str(cell.name)
            try:
                rotation_path = None
                if cell.rotation is not None:
                    rotation_path = learn_rotation(cell.rotation, model, out / "rotations" / cell.rotation.name,
                                                   data_dir, calib_split, learn_args)
                argv = ptq_argv(cell, model, path, rotation_path, common)
                start = time.perf_counter()
                result = run_ptq(parse_ptq_args(argv), cache=cache)
                result["experiment"] = {"cell": asdict(cell), "name": cell.name, "label": cell.label,
                                        "argv": argv, "wall_s": round(time.perf_counter() - start, 2)}
                result["label"] = cell.label
                write_json(path, result)
                done_now += 1
                logger.info("%s: wiki2 ppl %.2f", cell.name, result["wiki2_ppl"])
            except (RuntimeError, ValueError, FileNotFoundError, ImportError) as err:
                logger.error("cell %s failed: %s", cell.name, err)
                failures.append({"cell": cell.name, "error": str(err)})
                continue
        results[index] = result
    for index, cell in enumerate(cells):
        if index in results:
            rows.append(_summary_row(cell, results[index], out / "cells" / f"{cell.name}.json"))
    missing = [cell.name for i, cell in enumerate(cells) if i not in results]
    all_rows, made = write_report(out, model, figures)
    write_json(out / "results.json", {"model": model, "rows": all_rows, "this_run": {
        "cells": [row["cell"] for row in rows], "missing": missing, "failures": failures, "evaluated": done_now,
        "common_flags": list(common), "cache_hits": cache.hits}, "figures": made})
    logger.info("%d cells done (%d now), %d missing, %d failed; table in %s", len(rows), done_now, len(missing),
                len(failures), out / "table.md")
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinquant-experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="paper", choices=("paper", "random", "all"), help="which cells to run")
    parser.add_argument("--input_model", "--model", dest="model", default="smollm2-135m", help="model for every cell")
    parser.add_argument("--out", default="outputs/experiments", help="results folder (resumes from what is there)")
    parser.add_argument("--bits", default=",".join(PAPER_BITS), help="paper grid: bit settings, comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS), help="paper grid: methods, comma-separated")
    parser.add_argument("--weight_quantizers", default="rtn,gptq", help="paper grid: rtn, gptq or both")
    parser.add_argument("--rotation_policy", default="per_cell", choices=("per_cell", "shared"),
                        help="learn a rotation per bit setting (the paper) or one per variant and weight quantizer")
    parser.add_argument("--shared_rotation_bits", default="W4A4KV4", help="A/KV bits of the shared rotations")
    parser.add_argument("--random_bits", default="W4A4KV4", help="random grid: the bit setting")
    parser.add_argument("--random_seeds", type=int, default=10, help="random grid: rotations per random kind")
    parser.add_argument("--learned_seeds", type=int, default=1, help="random grid: learned rotations (seeds 0..N-1)")
    parser.add_argument("--seed", type=int, default=0, help="paper grid: seed of rotations, learning and data")
    parser.add_argument("--data_dir", default=None, help="local dataset mirror (default $SPINQUANT_DATA_DIR, else hub)")
    parser.add_argument("--calib_split", default=None, help="WikiText-2 split for learning and GPTQ (default train)")
    parser.add_argument("--ptq_args", default=PAPER_PTQ_FLAGS, help="flags every PTQ cell gets (quoted string)")
    parser.add_argument("--learn_args", default="", help="extra flags for scripts/10_optimize_rotation.sh")
    parser.add_argument("--tasks", nargs="?", const="", default=None,
                        help="also run zero-shot (lm-eval), comma-separated; the flag alone: the paper's tasks")
    parser.add_argument("--tasks_data_dir", default=None, help="local zero-shot data (e.g. ../shared/data/zeroshot)")
    parser.add_argument("--limit", type=int, default=None, help="zero-shot examples per task (quick runs)")
    parser.add_argument("--max_cells", type=int, default=None, help="evaluate at most N new cells, then stop")
    parser.add_argument("--dry_run", action="store_true", help="list the cells and their command lines, run nothing")
    parser.add_argument("--learn_only", action="store_true", help="learn the rotations the cells need, evaluate nothing")
    parser.add_argument("--report_only", action="store_true",
                        help="rewrite table.md / results.json (and --figures) from the finished cells, run nothing")
    parser.add_argument("--figures", action="store_true",
                        help="also draw the perplexity distribution over rotations and the learning loss curves")
    return parser


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        cells: list[Cell] = []
        if args.grid in ("paper", "all"):
            cells += paper_grid(_split(args.bits), _split(args.methods), _split(args.weight_quantizers),
                                args.rotation_policy, args.shared_rotation_bits, args.seed)
        if args.grid in ("random", "all"):
            cells += random_grid(args.random_bits, args.random_seeds, args.learned_seeds)
    except ValueError as err:
        logger.error("%s", err)
        return 2
    zeroshot_args: list[str] = []
    if args.tasks is not None or args.tasks_data_dir:
        zeroshot_args = (["--tasks", args.tasks] if args.tasks else ["--tasks"]) if args.tasks is not None else []
        zeroshot_args += ["--tasks_data_dir", args.tasks_data_dir] if args.tasks_data_dir else []
        zeroshot_args += ["--limit", str(args.limit)] if args.limit else []
    out = Path(args.out)
    common = shlex.split(args.ptq_args)
    if args.dry_run:
        jobs = sorted({cell.rotation.name for cell in cells if cell.rotation})
        print(f"{len(cells)} cells, {len(jobs)} learned rotations: {', '.join(jobs) or '-'}")
        for cell in cells:
            rotation = out / "rotations" / cell.rotation.name / "R.bin" if cell.rotation else None
            argv = ptq_argv(cell, args.model, out / "cells" / f"{cell.name}.json", rotation, [*common, *zeroshot_args])
            print(f"{cell.name}: spinquant-ptq {shlex.join(argv)}")
        return 0
    if args.report_only:
        rows, made = write_report(out, args.model, args.figures)
        write_json(out / "results.json", {"model": args.model, "rows": rows, "figures": made})
        print((out / "table.md").read_text())
        return 0
    if args.learn_only:
        jobs = {cell.rotation.name: cell.rotation for cell in cells if cell.rotation}
        for name, job in tqdm(sorted(jobs.items()), desc="learned rotations", unit="rotation"):
            try:
                learn_rotation(job, args.model, out / "rotations" / name, args.data_dir, args.calib_split,
                               shlex.split(args.learn_args))
            except RuntimeError as err:
                logger.error("%s", err)
                return 1
        return 0
    rows = run_experiments(cells, args.model, out, common, args.data_dir, args.calib_split,
                           shlex.split(args.learn_args), zeroshot_args, args.max_cells, args.figures)
    print((out / "table.md").read_text())
    return 0 if len(rows) == len(cells) else 1


if __name__ == "__main__":
    sys.exit(main())
