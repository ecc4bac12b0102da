"""The experiment driver: grid contents, command lines, resumability and the reuse of quantized weights."""

from __future__ import annotations

import json
import os
import shlex

import pytest

from spinquant.experiments import (
    PAPER_BITS,
    Bits,
    Cell,
    main,
    paper_grid,
    ptq_argv,
    random_grid,
    render_table,
    rotation_job_for,
)
from utils.args import parse_ptq_args

TINY_PTQ = "--w_clip --a_asym --k_asym --v_asym --k_groupsize 128 --v_groupsize 128 --bf16 False --model_max_length 32 "
TINY_PTQ += "--nsamples 4 --eval_windows 2 --per_device_eval_batch_size 2"
TINY_LEARN = "--max_steps 1 --model_max_length 32 --bf16 False --global_batch_size 2 --per_device_train_batch_size 2"


def test_bits_parse_and_print():
    assert Bits.parse("w4a8kv8") == Bits(4, 8, 8) and str(Bits(4, 16, 16)) == "W4A16KV16"
    assert Bits(4, 4, 4).paper == "4-4-4"
    with pytest.raises(ValueError, match="W4A8KV8"):
        Bits.parse("4-4-4")


def test_paper_grid_has_every_cell_once():
    cells = paper_grid()
    # FP once, then 4 quantized methods x 5 bit settings x 2 weight quantizers
    assert len(cells) == 1 + 4 * len(PAPER_BITS) * 2
    assert len({cell.name for cell in cells}) == len(cells)
    assert cells[0] == Cell("fp", Bits(16, 16, 16))
    learned = {cell.rotation.name for cell in cells if cell.rotation}
    # the paper: one rotation per variant, bit setting and weight quantizer (GPTQ's learned at 16 weight bits;
    # W4A16KV16 with GPTQ cannot learn at W16A16KV16, so it shares the RTN one)
    assert len(learned) == 18
    assert {c.rotation.name for c in cells if c.rotation and c.bits == Bits(4, 4, 4)} == {
        "had-W4A4KV4-seed0", "had-W16A4KV4-seed0", "no_had-W4A4KV4-seed0", "no_had-W16A4KV4-seed0"}
    shared = paper_grid(rotation_policy="shared")
    assert {cell.rotation.name for cell in shared if cell.rotation} == {
        "had-W4A4KV4-seed0", "had-W16A4KV4-seed0", "no_had-W4A4KV4-seed0", "no_had-W16A4KV4-seed0"}


def test_rotation_job_rules():
    job = rotation_job_for("spinquant_no_had", Bits(4, 8, 8), "gptq", "per_cell", Bits(4, 4, 4))
    assert (job.variant, job.bits) == ("no_had", Bits(16, 8, 8))
    assert rotation_job_for("spinquant_had", Bits(4, 16, 16), "gptq", "per_cell", Bits(4, 4, 4)).bits == Bits(4, 16, 16)
    assert rotation_job_for("spinquant_had", Bits(4, 8, 16), "rtn", "shared", Bits(4, 4, 4)).bits == Bits(4, 4, 4)
    with pytest.raises(ValueError, match="rotation_policy"):
        rotation_job_for("spinquant_had", Bits(4, 4, 4), "rtn", "sometimes", Bits(4, 4, 4))


def test_bad_grid_arguments_are_named():
    with pytest.raises(ValueError, match="--methods"):
        paper_grid(methods=["fp", "smoothquant"])
    assert main(["--methods", "fp,nope", "--dry_run"]) == 2


def test_random_grid_groups():
    cells = random_grid("W4A4KV4", random_seeds=3, learned_seeds=2)
    labels = [cell.label for cell in cells]
    assert labels.count("random_orthogonal") == 3 and labels.count("random_hadamard") == 3
    assert labels.count("learned") == 2
    assert {cell.rotate_mode for cell in cells if cell.label == "random_orthogonal"} == {"random"}


@pytest.mark.parametrize("cell", paper_grid(bits=["W4A8KV8"]), ids=lambda cell: cell.name)
def test_each_cell_is_a_valid_ptq_command_line(cell, tmp_path):
    rotation = tmp_path / "R.bin" if cell.rotation else None
    args = parse_ptq_args(ptq_argv(cell, "smollm2-135m", tmp_path / "x.json", rotation, shlex.split(TINY_PTQ)))
    assert (args.w_bits, args.a_bits, args.k_bits, args.v_bits) == (cell.bits.w, cell.bits.a, cell.bits.kv, cell.bits.kv)
    assert args.w_rtn == (cell.weight_quantizer == "rtn")
    assert args.rotate == (cell.method not in ("fp", "rtn"))
    assert args.online_hadamard == (cell.method != "spinquant_no_had")
    assert (args.optimized_rotation_path is not None) == cell.method.startswith("spinquant")


def test_table_layout():
    rows = [
        {"cell": "fp", "method": "fp", "bits": "W16A16KV16", "weight_quantizer": None, "wiki2_ppl": 21.6,
         "zeroshot_avg": None},
        {"cell": "q", "method": "quarot", "bits": "W4A4KV4", "weight_quantizer": "gptq", "wiki2_ppl": 41.9,
         "zeroshot_avg": None},
        {"cell": "r", "method": "rtn", "bits": "W4A4KV4", "weight_quantizer": "rtn", "wiki2_ppl": 3538.2,
         "zeroshot_avg": None},
        {"cell": "h", "method": "quarot", "bits": "W4A4KV4", "label": "random_hadamard", "weight_quantizer": "rtn",
         "wiki2_ppl": 120.0},
        {"cell": "h2", "method": "quarot", "bits": "W4A4KV4", "label": "random_hadamard", "weight_quantizer": "rtn",
         "wiki2_ppl": 100.0},
    ]
    table = render_table(rows, "tiny")
    lines = table.splitlines()
    assert "| 16-16-16 | FP | - | 21.60 |" in lines
    # RTN before QuaRot within a block, and large values in short scientific-ish form
    assert lines.index("| 4-4-4 | RTN (no rotation) | RTN | 3.54e+03 |") < lines.index(
        "| 4-4-4 | QuaRot (random Hadamard R1-R4) | GPTQ | 41.90 |")
    assert "| random_hadamard | 2 | 100.00 | 110.00 | 120.00 |" in lines


@pytest.fixture()
def cpu_env(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_driver_runs_learns_resumes_and_reuses_weights(cpu_env, tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "exp"
    argv = [
        "--grid", "all", "--model", str(tiny_model_dir), "--out", str(out), "--bits", "W4A8KV8,W4A4KV4",
        "--methods", "fp,rtn,quarot,spinquant_had", "--weight_quantizers", "rtn", "--rotation_policy", "shared",
        "--random_seeds", "2", "--learned_seeds", "1", "--data_dir", str(tiny_data_dir), "--calib_split",
        "validation", "--ptq_args", TINY_PTQ, "--learn_args", TINY_LEARN,
    ]
    assert main(argv) == 0
    summary = json.loads((out / "results.json").read_text())
    names = {row["cell"] for row in summary["rows"]}
    assert len(names) == 1 + 2 * 3 + 2 * 2 + 1
    assert not summary["this_run"]["missing"] and not summary["this_run"]["failures"]
    assert all(row["wiki2_ppl"] > 1 for row in summary["rows"])
    # one learned rotation (had, W4A4KV4, seed 0) serves both columns and the random grid's "learned" group
    assert sorted(p.name for p in (out / "rotations").iterdir()) == ["had-W4A4KV4-seed0"]
    assert (out / "rotations" / "had-W4A4KV4-seed0" / "train_log.jsonl").is_file()
    # the second bit setting of each method reuses the first one's quantized weights
    assert summary["this_run"]["cache_hits"]["weights"] >= 3
    assert "| 4-8-8 | SpinQuant had (learned R1, R2 + R3, R4) | RTN |" in (out / "table.md").read_text()
    cell = json.loads((out / "cells" / "spinquant_had-W4A4KV4-rtn.json").read_text())
    assert cell["config"]["optimized_rotation_path"].endswith("had-W4A4KV4-seed0/R.bin")
    assert cell["experiment"]["name"] == "spinquant_had-W4A4KV4-rtn"
    # a reused-weights cell gives the same perplexity as computing from scratch (same flags, same process)
    reused = json.loads((out / "cells" / "quarot-W4A4KV4-rtn.json").read_text())
    assert reused["reused_weights"] is True

    stamps = {p.name: os.stat(p).st_mtime_ns for p in (out / "cells").iterdir()}
    assert main(argv) == 0  # resumes: nothing left to do
    assert {p.name: os.stat(p).st_mtime_ns for p in (out / "cells").iterdir()} == stamps

    # the report (table over every finished cell, figures) regenerates from the results alone
    os.remove(out / "table.md")
    assert main(["--report_only", "--figures", "--out", str(out), "--model", "tiny"]) == 0
    table = (out / "table.md").read_text()
    assert "| random_hadamard | 2 |" in table and "| 4-4-4 | FP" not in table and "| 16-16-16 | FP | - |" in table
    assert (out / "figures" / "ppl_distribution.png").is_file() and (out / "figures" / "loss_curves.png").is_file()
    distribution = json.loads((out / "figures" / "ppl_distribution.json").read_text())
    assert "learned" in json.dumps(distribution)

    os.remove(out / "cells" / "rtn-W4A4KV4-rtn.json")
    assert main(argv + ["--max_cells", "1"]) == 0
    assert (out / "cells" / "rtn-W4A4KV4-rtn.json").is_file()


def test_reused_weights_match_a_fresh_run(cpu_env, tiny_model_dir, tiny_data_dir, tmp_path):
    """The weight cache is an optimisation only: the perplexity equals a run that quantizes from scratch."""
    from spinquant.ptq import PTQCache, run_ptq

    def args(bits: str, name: str):
        cell = Cell("quarot", Bits.parse(bits), "gptq")
        flags = shlex.split(TINY_PTQ) + ["--data_dir", str(tiny_data_dir), "--calib_split", "validation"]
        return parse_ptq_args(ptq_argv(cell, str(tiny_model_dir), tmp_path / name, None, flags))

    cache = PTQCache()
    run_ptq(args("W4A8KV8", "a.json"), cache=cache)
    second = run_ptq(args("W4A4KV4", "b.json"), cache=cache)
    fresh = run_ptq(args("W4A4KV4", "c.json"))
    assert second["reused_weights"] and not fresh["reused_weights"]
    # same weights, same activation quantizers, same data, same device: bit-identical (tolerance 0)
    assert second["wiki2_ppl"] == fresh["wiki2_ppl"]


def test_learn_only_learns_and_evaluates_nothing(cpu_env, tiny_model_dir, tiny_data_dir, tmp_path):
    argv = [
        "--grid", "random", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--random_seeds", "0",
        "--learned_seeds", "2", "--data_dir", str(tiny_data_dir), "--calib_split", "validation",
        "--learn_args", TINY_LEARN, "--learn_only",
    ]
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "rotations").iterdir()) == ["had-W4A4KV4-seed0", "had-W4A4KV4-seed1"]
    assert not (tmp_path / "cells").exists()
    # a failing learning run is reported with its log
    assert main(argv[:-3] + ["--learned_seeds", "3", "--learn_args", "--max_steps 0", "--learn_only"]) == 1


def test_tasks_add_the_zero_shot_column(cpu_env, tiny_model_dir, tiny_data_dir, tmp_path):
    """--tasks runs lm-eval in every cell and the table gains the 0-shot column; cells lacking it are redone."""
    from tests.conftest import SHARED_DATA

    shared = SHARED_DATA / "zeroshot"
    if not (shared / "piqa" / "validation.jsonl").is_file():
        pytest.skip(f"zero-shot data not found at {shared}")
    tasks = tmp_path / "zeroshot"
    for task, split in (("piqa", "validation"), ("winogrande", "validation")):
        (tasks / task).mkdir(parents=True)
        with open(shared / task / f"{split}.jsonl", encoding="utf-8") as handle:
            (tasks / task / f"{split}.jsonl").write_text("".join(next(handle) for _ in range(4)), encoding="utf-8")
    out = tmp_path / "exp"
    base = [
        "--grid", "paper", "--model", str(tiny_model_dir), "--out", str(out), "--bits", "W4A8KV8", "--methods",
        "fp,quarot", "--weight_quantizers", "rtn", "--data_dir", str(tiny_data_dir), "--ptq_args", TINY_PTQ,
    ]
    assert main(base) == 0
    assert "0-shot" not in (out / "table.md").read_text()
    assert main(base + ["--tasks", "piqa,winogrande", "--tasks_data_dir", str(tasks), "--limit", "2"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 2 and all(0 <= row["zeroshot_avg"] <= 1 for row in rows)
    assert set(rows[0]["zeroshot"]["tasks"]) == {"piqa", "winogrande"}
    assert "| 0-shot avg (%) |" in (out / "table.md").read_text()
