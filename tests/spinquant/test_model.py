"""spinquant.model: the GGUF conversion cache of the built-in SmolLM2-135M, alone and under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spinquant import model as model_module
from tests.conftest import requires_smollm2

pytestmark = [requires_smollm2, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]

# Each torchrun process loads the built-in model into an empty cache, with a process group initialised first (as
# the rotation-learning entry point does), and prints the logits of a fixed input.
_LOAD_UNDER_TORCHRUN = """
import sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
from spinquant.model import load_model
model, _ = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
with torch.no_grad():
    logits = model(input_ids=torch.arange(1, 9)[None]).logits
torch.save(logits, sys.argv[1] + f"/logits{dist.get_rank()}.pt")
dist.destroy_process_group()
"""


def test_gguf_cache_holds_the_same_model(tmp_path, monkeypatch):
    # The cached folder must load to exactly the values transformers dequantizes from the GGUF file each time.
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv(model_module.CACHE_ENV, str(tmp_path))
    cached, _ = model_module.load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    folder = next((tmp_path / "gguf").iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    source = model_module.resolve_model_source("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        assert torch.equal(cached(input_ids=ids).logits, direct.eval()(input_ids=ids).logits)
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()  # still tied


def test_two_torchrun_processes_convert_into_an_empty_cache(tmp_path):
    # Regression: transformers' save_pretrained writes nothing on rank 1 of an initialised process group, so rank 1
    # published a folder with only the tokenizer and rank 0 failed ("Directory not empty").
    script = tmp_path / "load.py"
    script.write_text(_LOAD_UNDER_TORCHRUN)
    env = {**os.environ, model_module.CACHE_ENV: str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    folders = list((tmp_path / "cache" / "gguf").iterdir())
    assert [f.name.startswith(".") for f in folders] == [False]  # one published folder, no staging left behind
    assert (folders[0] / "model.safetensors").is_file()
    assert torch.equal(torch.load(tmp_path / "logits0.pt"), torch.load(tmp_path / "logits1.pt"))
