"""The rotation-learning entry point end to end: outputs, R.bin for PTQ, resume, errors, torchrun DDP and FSDP,
the shell scripts, and a real SmolLM2 run.

Distributed tolerances. Data parallel: two processes sum the same float32 gradients in another order than one
process (~1e-7 relative); after 3 Cayley steps the rotations agree to ~1e-7 (observed 6e-8); we allow 1e-5. FSDP
computes the rotated weights on the fly and gets the R1/R2 gradient from plain autograd instead of the per-step
cache's gradient hooks: the same sums in another order, and once the rotations differ by ~1e-7 a weight or
activation sitting on a 4-bit rounding boundary can round the other way in the next step, so after 3 steps
entries differ by up to ~2e-5; we allow 1e-4. Both are far below what a wrong batch split does: learning on
other blocks moves entries by 1e-3..6e-3 in these 3 steps (the steps move them by ~1e-2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spinquant.optimize_rotation import main, resolve_rotation_path
from spinquant.rotation import R1_KEY, load_rotations, r2_key
from tests.conftest import requires_smollm2

ROOT = Path(__file__).resolve().parents[2]
QUANT_FLAGS = [
    "--w_bits", "4", "--a_bits", "4", "--k_bits", "4", "--v_bits", "4", "--w_clip", "--a_asym", "--k_asym",
    "--v_asym", "--k_groupsize", "128", "--v_groupsize", "128",
]
DDP_TOLERANCE = 1e-5
FSDP_TOLERANCE = 1e-4


def _argv(model_dir, data_dir, out: Path, *extra) -> list[str]:
    return [
        "--input_model", str(model_dir), "--data_dir", str(data_dir), "--bf16", "False", "--model_max_length", "32",
        "--max_steps", "3", "--global_batch_size", "4", "--output_dir", str(out), "--no_progress", *QUANT_FLAGS,
        *extra,
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _torchrun(nproc: int, argv: list[str]) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "spinquant.optimize_rotation", *argv,
    ]
    return subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def single_process_run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """One process, global batch 4 = one micro-batch of 4: the reference for the distributed runs."""
    out = tmp_path_factory.mktemp("single")
    assert main(_argv(tiny_model_dir, tiny_data_dir, out, "--per_device_train_batch_size", "4")) == 0
    return out


def test_outputs_of_a_run(single_process_run, tiny_model_dir):
    out = single_process_run
    summary = json.loads((out / "optimize_rotation.json").read_text())
    from spinquant.model import load_model

    model, _ = load_model(str(tiny_model_dir), device="cpu")
    rotations = load_rotations(out / "R.bin", model)
    assert set(rotations) == {R1_KEY, r2_key(0), r2_key(1)}
    raw = torch.load(out / "R.bin", weights_only=True)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in raw.values())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert (out / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    training = summary["training"]
    assert training["steps_run"] == 3 and training["gradient_accumulation_steps"] == 1
    assert training["cache_weights"] is True and training["world_size"] == 1
    for key in ("step_time_s_mean", "tokens_per_s", "rotation_s_per_step", "forward_backward_s_per_step"):
        assert training[key] > 0, key
    assert summary["max_orthogonality_error"] < 1e-4
    assert summary["resolved"]["quant"]["k_groupsize"] == 16  # 128 clamped to head_dim, as in PTQ
    assert {"load_model", "load_data", "build_network", "train", "save", "total"} <= set(summary["timings"])
    assert summary["config"]["learning_rate"] == 1.5 and summary["config"]["lr_scheduler_type"] == "cosine"


def test_learned_rotation_feeds_ptq(single_process_run, tiny_model_dir, tiny_data_dir, tmp_path):
    from spinquant.ptq import main as ptq_main

    result = tmp_path / "ptq.json"
    code = ptq_main([
        "--input_model", str(tiny_model_dir), "--data_dir", str(tiny_data_dir), "--model_max_length", "32",
        "--rotate", "--optimized_rotation_path", str(single_process_run / "R.bin"), "--w_rtn", *QUANT_FLAGS,
        "--eval_windows", "2", "--result_json", str(result), "--no_progress",
    ])
    assert code == 0
    assert json.loads(result.read_text())["wiki2_ppl"] > 1


def test_resume_flag_continues_from_the_checkpoint(single_process_run, tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_argv(tiny_model_dir, tiny_data_dir, out, "--per_device_train_batch_size", "4", "--max_steps", "3")) == 0
    first = torch.load(out / "R.bin", weights_only=True)
    assert main(_argv(tiny_model_dir, tiny_data_dir, out, "--per_device_train_batch_size", "4", "--resume")) == 0
    summary = json.loads((out / "optimize_rotation.json").read_text())["training"]
    assert summary["start_step"] == 3 and summary["steps_run"] == 0
    again = torch.load(out / "R.bin", weights_only=True)
    assert all(torch.equal(first[k], again[k]) for k in first)
    # a different recipe cannot resume this checkpoint
    assert main(_argv(tiny_model_dir, tiny_data_dir, out, "--resume", "--learning_rate", "1.0")) == 2


def test_output_rotation_path_is_a_file_or_a_folder(tmp_path):
    assert resolve_rotation_path(None, "out") == Path("out") / "R.bin"
    assert resolve_rotation_path(str(tmp_path / "rot.bin"), "out") == tmp_path / "rot.bin"
    assert resolve_rotation_path(str(tmp_path / "folder"), "out") == tmp_path / "folder" / "R.bin"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--fsdp", "full_shard offload"], "offload"),
        (["--per_device_train_batch_size", "3"], "--global_batch_size"),
        (["--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "NoSuchLayer"], "NoSuchLayer"),
    ],
)
def test_bad_input_exits_2_naming_the_flag(tiny_model_dir, tiny_data_dir, tmp_path, caplog, extra, message):
    assert main(_argv(tiny_model_dir, tiny_data_dir, tmp_path, *extra)) == 2
    assert message in caplog.text


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--weight_decay", "0.1"], "--weight_decay"),
        (["--max_steps", "0"], "--max_steps"),
        (["--bf16", "True", "--fp16", "True"], "exclusive"),
        (["--momentum", "1.5"], "--momentum"),
    ],
)
def test_bad_flags_are_parser_errors(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--output_dir", str(tmp_path), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_are_the_papers():
    from utils.args import parse_train_args

    args = parse_train_args([])
    assert (args.max_steps, args.learning_rate, args.lr_scheduler_type, args.weight_decay) == (100, 1.5, "cosine", 0.0)
    assert args.bf16 is True and args.fp16 is False and args.gradient_checkpointing is True
    assert (args.global_batch_size, args.per_device_train_batch_size, args.model_max_length) == (8, 1, 2048)
    assert (args.momentum, args.cayley_iterations, args.max_grad_norm) == (0.0, 5, 1.0)
    assert parse_train_args(["--fp16", "True"]).bf16 is False
    # the paper's trainer flags are accepted
    parse_train_args(["--save_safetensors", "False", "--log_on_each_node", "False", "--logging_dir", "x", "--do_train"])


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_learn_the_same_rotations_as_one(single_process_run, tiny_model_dir, tiny_data_dir, tmp_path, fsdp):
    # 2 processes x 1 block x 2 micro-batches = the same global batch of 4 as the single-process reference.
    extra = ["--per_device_train_batch_size", "1"] + (["--fsdp", "full_shard auto_wrap"] if fsdp else [])
    done = _torchrun(2, _argv(tiny_model_dir, tiny_data_dir, tmp_path, *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "optimize_rotation.json").read_text())
    assert summary["training"]["world_size"] == 2 and summary["training"]["gradient_accumulation_steps"] == 2
    assert summary["training"]["cache_weights"] is (not fsdp)
    if fsdp:
        assert summary["resolved"]["fsdp_wrapped"] == ["LlamaDecoderLayer"]
    reference = torch.load(single_process_run / "R.bin", weights_only=True)
    learned = torch.load(tmp_path / "R.bin", weights_only=True)
    tolerance = FSDP_TOLERANCE if fsdp else DDP_TOLERANCE
    for key in reference:
        torch.testing.assert_close(learned[key], reference[key], rtol=0, atol=tolerance)
    steps = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    reference_steps = [json.loads(line) for line in (single_process_run / "train_log.jsonl").read_text().splitlines()]
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in reference_steps], rel=1e-4)


def test_fsdp_in_one_process_matches_too(single_process_run, tiny_model_dir, tiny_data_dir, tmp_path):
    argv = _argv(tiny_model_dir, tiny_data_dir, tmp_path, "--per_device_train_batch_size", "4", "--fsdp", "full_shard")
    assert main(argv) == 0
    reference = torch.load(single_process_run / "R.bin", weights_only=True)
    learned = torch.load(tmp_path / "R.bin", weights_only=True)
    for key in reference:
        torch.testing.assert_close(learned[key], reference[key], rtol=0, atol=FSDP_TOLERANCE)


@pytest.mark.parametrize("script", ["10_optimize_rotation.sh", "11_optimize_rotation_fsdp.sh"])
def test_scripts_run_on_a_cpu(script, tiny_model_dir, tiny_data_dir, tmp_path):
    env = _env() | {"SPINQUANT_OUTPUT_DIR": str(tmp_path), "PYTHON": sys.executable, "GLOBAL_BATCH": "2"}
    command = [
        "bash", str(ROOT / "scripts" / script), str(tiny_model_dir), "4", "4", "4", "--data_dir", str(tiny_data_dir),
        "--model_max_length", "32", "--max_steps", "1", "--no_progress", "--bf16", "False",
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "0 GPU(s) found: 1 process(es) x per-device batch 2" in done.stderr
    run = f"{tiny_model_dir.name}_W4A4KV4" + ("_fsdp" if "fsdp" in script else "")
    folder = tmp_path / "rotation" / run
    summary = json.loads((folder / "optimize_rotation.json").read_text())
    assert (folder / "R.bin").is_file() and (folder / "train_log.jsonl").is_file()
    assert summary["config"]["w_clip"] is True and summary["config"]["k_groupsize"] == 128
    assert summary["resolved"]["fsdp"] == (["auto_wrap", "full_shard"] if "fsdp" in script else [])


@requires_smollm2
@pytest.mark.slow
def test_real_smollm2_learns_for_a_step(shared_data_dir, tmp_path):
    """SmolLM2-135M on two 64-token blocks of the real validation split, W4A4KV4 RTN (no clip search: it costs
    minutes on a CPU), one step: the whole pipeline on the real architecture (30 layers, GQA, tied embeddings)."""
    argv = [
        "--input_model", "smollm2-135m", "--data_dir", str(shared_data_dir), "--calib_split", "validation",
        "--bf16", "False", "--model_max_length", "64", "--max_steps", "1", "--global_batch_size", "2",
        "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path), "--no_progress",
        "--w_bits", "4", "--a_bits", "4", "--k_bits", "4", "--v_bits", "4", "--a_asym", "--k_asym", "--v_asym",
        "--k_groupsize", "64", "--v_groupsize", "64",
    ]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "optimize_rotation.json").read_text())
    assert 2 < summary["training"]["loss_first"] < 12  # a real LM on real text, quantized
    rotations = torch.load(tmp_path / "R.bin", weights_only=True)
    assert rotations[R1_KEY].shape == (576, 576) and len(rotations) == 31
    assert summary["max_orthogonality_error"] < 1e-4


def test_the_papers_command_line_parses():
    """scripts/10_optimize_rotation.sh and 11_optimize_rotation_fsdp.sh of the paper's repository, verbatim."""
    from utils.args import parse_train_args

    args = parse_train_args([
        "--input_model", "meta-llama/Llama-2-7b-hf", "--output_rotation_path", "your_path", "--output_dir",
        "your_output_path/", "--logging_dir", "your_log_path/", "--model_max_length", "2048", "--fp16", "False",
        "--bf16", "True", "--log_on_each_node", "False", "--per_device_train_batch_size", "1", "--logging_steps", "1",
        "--learning_rate", "1.5", "--weight_decay", "0.", "--lr_scheduler_type", "cosine", "--gradient_checkpointing",
        "True", "--save_safetensors", "False", "--max_steps", "100", "--w_bits", "4", "--a_bits", "4", "--k_bits", "4",
        "--v_bits", "4", "--w_clip", "--a_asym", "--k_asym", "--v_asym", "--k_groupsize", "128", "--v_groupsize", "128",
        "--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
    ])
    assert args.bf16 is True and args.per_device_train_batch_size == 1 and args.fsdp == "full_shard auto_wrap"
    assert resolve_rotation_path(args.output_rotation_path, args.output_dir) == Path("your_path") / "R.bin"


def test_learning_can_start_from_an_existing_r_bin(single_process_run, tiny_model_dir, tiny_data_dir, tmp_path):
    start = single_process_run / "R.bin"
    argv = _argv(tiny_model_dir, tiny_data_dir, tmp_path, "--per_device_train_batch_size", "4", "--max_steps", "1",
                 "--optimized_rotation_path", str(start))
    assert main(argv) == 0
    summary = json.loads((tmp_path / "optimize_rotation.json").read_text())
    assert summary["resolved"]["init_rotations"] == str(start)
    # same first blocks, learned instead of random Hadamard rotations: a lower quantized loss
    first = json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[0])
    first_of_start = json.loads((single_process_run / "train_log.jsonl").read_text().splitlines()[0])
    assert first["loss"] < first_of_start["loss"]
