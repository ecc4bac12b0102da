"""The PTQ entry point end to end on a tiny local model: printed line, JSON result, script defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spinquant.ptq import main, resolve_dtype

ROOT = Path(__file__).resolve().parents[2]


def _run(tiny_model_dir, tiny_data_dir, tmp_path, *extra):
    out = tmp_path / "result.json"
    argv = [
        "--input_model", str(tiny_model_dir), "--data_dir", str(tiny_data_dir), "--model_max_length", "32",
        "--per_device_eval_batch_size", "3", "--result_json", str(out), "--no_progress", *extra,
    ]
    return main(argv), out


def test_w4a4kv4_rtn_with_rotation_writes_a_complete_result(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    code, out = _run(
        tiny_model_dir, tiny_data_dir, tmp_path, "--w_bits", "4", "--a_bits", "4", "--k_bits", "4", "--v_bits", "4",
        "--w_rtn", "--w_clip", "--a_asym", "--k_asym", "--v_asym", "--k_groupsize", "128", "--v_groupsize", "128",
        "--rotate",
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "wiki2 ppl is: " in printed
    result = json.loads(out.read_text())
    assert set(result) >= {"config", "wiki2_ppl", "device", "timings", "resolved"}
    assert float(printed.split("wiki2 ppl is: ")[1].split()[0]) == pytest.approx(result["wiki2_ppl"])
    assert result["config"]["w_bits"] == 4 and result["config"]["rotate"] is True
    assert result["resolved"]["quant"]["k_groupsize"] == 16  # clamped to head_dim
    assert {"load_model", "rotate", "quantize", "eval_ppl", "total"} <= set(result["timings"])
    assert result["device"]["type"] == "cpu"
    assert 1 < result["wiki2_ppl"] < 1e6


def test_full_precision_run_and_eval_window_limit(tiny_model_dir, tiny_data_dir, tmp_path):
    code, out = _run(tiny_model_dir, tiny_data_dir, tmp_path, "--eval_windows", "2")
    assert code == 0
    assert json.loads(out.read_text())["ppl_eval"]["windows"] == 2


def test_clear_errors_exit_with_code_2(tiny_model_dir, tiny_data_dir, tmp_path, caplog):
    code, _ = _run(tiny_model_dir, tiny_data_dir, tmp_path, "--rotate", "--optimized_rotation_path",
                   str(tmp_path / "missing.bin"))
    assert code == 2
    assert "--optimized_rotation_path" in caplog.text
    code, _ = _run(tiny_model_dir, tmp_path / "nodata", tmp_path)
    assert code == 2 and "--data_dir" in caplog.text


def test_unsupported_architecture_fails_before_loading_weights(tmp_path, tiny_data_dir, caplog):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    code = main(["--input_model", str(tmp_path), "--data_dir", str(tiny_data_dir), "--no_progress"])
    assert code == 2
    assert "unsupported architecture GPT2LMHeadModel" in caplog.text


def test_dtype_rule():
    import torch

    assert resolve_dtype(True, False, torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype(False, True, torch.device("cpu")) == torch.float16
    assert resolve_dtype(False, False, torch.device("cpu")) == torch.float32
    assert resolve_dtype(False, False, torch.device("cuda")) == torch.float16


def test_eval_script_passes_the_papers_defaults(tiny_model_dir, tiny_data_dir, tmp_path):
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "SPINQUANT_OUTPUT_DIR": str(tmp_path),
        "SPINQUANT_DATA_DIR": str(tiny_data_dir),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "2_eval_ptq.sh"), str(tiny_model_dir), "4", "4", "4",
         "--w_rtn", "--model_max_length", "32", "--no_progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wiki2 ppl is:" in proc.stdout
    result_files = list(tmp_path.glob("ptq/*/ptq_result.json"))
    assert len(result_files) == 1
    config = json.loads(result_files[0].read_text())["config"]
    assert config["w_clip"] and config["a_asym"] and config["k_asym"] and config["v_asym"] and config["rotate"]
    assert config["k_groupsize"] == 128 and config["bf16"] is True and config["w_bits"] == 4
