"""ExecuTorch export: the checkpoint layout (always), and ExecuTorch's own loader, export and runtime (if installed)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from spinquant.config import QuantConfig, RotationConfig
from spinquant.export_executorch import (
    ExecuTorchExportError,
    _agreement,
    _meta_rope_rows,
    check_export_config,
    executorch_checkpoint,
    executorch_hadamard_size,
    executorch_params,
    mirror_executorch_activations,
    our_logits,
    pad_mlp_for_executorch,
    quantize_embeddings_for_executorch,
    save_executorch_checkpoint,
)
from spinquant.qmodel import load_qmodel, save_qmodel
from spinquant.quantize import quantize_
from spinquant.rotation import rotate_
from tests.helpers import make_tiny_model

requires_executorch = pytest.mark.skipif(
    importlib.util.find_spec("executorch") is None, reason="ExecuTorch not installed (pip install executorch==1.5.1)"
)

W4A8 = dict(w_bits=4, w_groupsize=32, w_rtn=True, w_clip=True, a_bits=8, a_asym=True)


def _exportable(intermediate=96, tie=True, quant=W4A8):
    """A tiny model prepared as --export_to_et prepares one (intermediate 96 = 12 * 8 gets padded to 128)."""
    model = make_tiny_model("llama", intermediate=intermediate, tie=tie)
    padded = pad_mlp_for_executorch(model)
    rotate_(model, RotationConfig(rotate=True))
    quantize_embeddings_for_executorch(model, clip_search=True)
    quantize_(model, QuantConfig(**quant), progress=False)
    return model, padded


# ------------------------------------------------------------------------------------------------------------
# Flags and padding
# ------------------------------------------------------------------------------------------------------------


def test_the_papers_w4a8_group32_flags_are_accepted():
    check_export_config(QuantConfig(**W4A8), RotationConfig(rotate=True))


@pytest.mark.parametrize(
    "quant, rotation, needle",
    [
        ({**W4A8, "w_bits": 3}, True, "--w_bits 4"),
        ({**W4A8, "w_asym": True}, True, "no --w_asym"),
        ({**W4A8, "w_groupsize": 16}, True, "--w_groupsize in (32, 64, 128, 256)"),
        ({**W4A8, "a_bits": 4}, True, "--a_bits 8 --a_asym"),
        ({**W4A8, "k_bits": 4}, True, "no R3 and no KV quantization"),
        ({**W4A8, "int8_down_proj": True}, True, "no --int8_down_proj"),
        (W4A8, False, "--rotate"),
    ],
)
def test_flags_executorch_cannot_run_are_refused(quant, rotation, needle):
    with pytest.raises(ExecuTorchExportError, match="--export_to_et needs") as err:
        check_export_config(QuantConfig(**quant), RotationConfig(rotate=rotation))
    assert needle in str(err.value)


def test_hadamard_sizes_executorch_can_compute():
    assert executorch_hadamard_size(1536) == 2048  # SmolLM2: 12 * 128 is not supported natively
    assert executorch_hadamard_size(8192) == 8192  # LLaMA 3.2 1B/3B
    assert executorch_hadamard_size(14336) == 16384  # LLaMA 3 8B: 28 * 512, which ExecuTorch does unnormalised
    assert executorch_hadamard_size(96) == 128


def test_padding_the_mlp_keeps_the_function():
    model = make_tiny_model("llama", intermediate=96)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert pad_mlp_for_executorch(model) == {"from": 96, "to": 128}
        after = model(input_ids=ids).logits
    layer = model.model.layers[0].mlp
    assert layer.gate_proj.weight.shape == (128, 64) and layer.down_proj.weight.shape == (64, 128)
    assert model.config.intermediate_size == 128
    # The padded channels are exactly zero; only the summation order of down_proj changes (float32 round-off).
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert pad_mlp_for_executorch(model) is None


def test_padding_after_rotation_is_refused():
    model = make_tiny_model("llama", intermediate=96)
    rotate_(model, RotationConfig(rotate=True))
    with pytest.raises(ExecuTorchExportError, match="before the model is rotated"):
        pad_mlp_for_executorch(model)


# ------------------------------------------------------------------------------------------------------------
# The checkpoint layout
# ------------------------------------------------------------------------------------------------------------


def test_checkpoint_has_executorchs_names_dtypes_and_shapes():
    model, _ = _exportable()
    state = executorch_checkpoint(model)
    assert next(iter(state.values())).dtype == torch.float32  # ExecuTorch reads the dtype off the first tensor
    expected = {"norm.weight", "tok_embeddings.weight", "tok_embeddings.scales", "output.weight", "output.scales"}
    for i in range(2):
        expected |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
        for name in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                     "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
            expected |= {f"layers.{i}.{name}.weight", f"layers.{i}.{name}.scales"}
    assert set(state) == expected
    shapes = {
        "tok_embeddings.weight": (300, 64), "tok_embeddings.scales": (300,), "output.weight": (300, 64),
        "output.scales": (300,), "layers.0.attention.wq.weight": (64, 64), "layers.0.attention.wq.scales": (64, 2),
        "layers.0.attention.wk.weight": (32, 64), "layers.0.feed_forward.w1.weight": (128, 64),
        "layers.0.feed_forward.w2.weight": (64, 128), "layers.0.feed_forward.w2.scales": (64, 4),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    for key, value in state.items():
        if key.endswith(".weight") and "norm" not in key:
            assert value.dtype == torch.int8, key
            low, high = (-128, 127) if key.split(".")[0] in ("tok_embeddings", "output") else (-8, 7)
            assert low <= value.min() and value.max() <= high, key
        else:
            assert value.dtype == torch.float32, key
    assert torch.equal(state["layers.1.ffn_norm.weight"], torch.ones(64))  # norms were fused into the linears


def test_checkpoint_dequantizes_to_our_weights_bitwise():
    model, _ = _exportable()
    state = executorch_checkpoint(model)
    layer = model.model.layers[1]

    def dequant(key, groupsize):
        q, scales = state[f"{key}.weight"].float(), state[f"{key}.scales"]
        return (q.reshape(q.shape[0], -1, groupsize) * scales.reshape(q.shape[0], -1, 1)).reshape(q.shape)

    assert torch.equal(dequant("layers.1.attention.wv", 32), layer.self_attn.v_proj.weight)
    assert torch.equal(dequant("layers.1.feed_forward.w2", 32), layer.mlp.down_proj.weight)
    assert torch.equal(dequant("layers.1.feed_forward.w3", 32), layer.mlp.up_proj.weight)
    # Q/K rows are in Meta's interleaved RoPE order
    assert torch.equal(dequant("layers.1.attention.wq", 32), _meta_rope_rows(layer.self_attn.q_proj.weight, 4))
    assert torch.equal(dequant("layers.1.attention.wk", 32), _meta_rope_rows(layer.self_attn.k_proj.weight, 2))
    assert torch.equal(dequant("tok_embeddings", 64), model.model.embed_tokens.weight)
    assert torch.equal(dequant("output", 64), model.lm_head.weight)


def _hf_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * torch.cat((cos, cos), -1) + rotated * torch.cat((sin, sin), -1)


def _meta_rope(x, cos, sin):
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    return torch.stack((real * cos - imag * sin, real * sin + imag * cos), -1).reshape(x.shape)


def test_meta_row_order_turns_hf_rope_into_metas():
    head_dim, heads = 16, 3
    angles = torch.rand(head_dim // 2) * 3
    cos, sin = angles.cos(), angles.sin()
    q = torch.randn(heads * head_dim, dtype=torch.float64)  # one token's query, HF layout
    hf = torch.cat([_hf_rope(h, cos, sin) for h in q.reshape(heads, head_dim)])
    meta = torch.cat([_meta_rope(h, cos, sin) for h in _meta_rope_rows(q, heads).reshape(heads, head_dim)])
    torch.testing.assert_close(meta, _meta_rope_rows(hf, heads), rtol=0, atol=1e-12)


def test_params_json_describes_the_padded_model():
    model, _ = _exportable()
    params = executorch_params(model, 32)
    assert params == {
        "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "vocab_size": 300,
        "hidden_dim": 128, "norm_eps": 1e-6, "rope_theta": 10000.0, "use_scaled_rope": False,
        "quantization_args": {"group_size": 32},
    }


def test_files_are_written_side_by_side(tmp_path):
    model, _ = _exportable()
    paths = save_executorch_checkpoint(model, tmp_path / "executorch_model.bin")
    state = torch.load(paths.checkpoint, weights_only=True)
    assert set(state) == set(executorch_checkpoint(model))
    assert paths.params.name == "executorch_model.params.json"
    info = json.loads(paths.info.read_text())
    assert "++base.checkpoint=" + str(paths.checkpoint) in info["export_command"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "executorch_model.bin", "executorch_model.export.json", "executorch_model.params.json"
    ]


def test_models_not_prepared_for_executorch_are_refused(tmp_path):
    model = make_tiny_model("llama", intermediate=128)
    rotate_(model, RotationConfig(rotate=True))
    quantize_(model, QuantConfig(**W4A8), progress=False)
    with pytest.raises(ExecuTorchExportError, match="token embedding is not quantized"):
        executorch_checkpoint(model)
    asym, _ = _exportable(quant={**W4A8, "w_asym": True})
    with pytest.raises(ExecuTorchExportError, match="4-bit asymmetric, ExecuTorch needs 4-bit symmetric"):
        executorch_checkpoint(asym)
    with pytest.raises(ExecuTorchExportError, match="not quantized"):
        save_executorch_checkpoint(make_tiny_model(), tmp_path / "x.bin")


def test_prepared_model_round_trips_with_its_8bit_embedding_as_integers(tmp_path):
    model, _ = _exportable()
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(2))
    saved = save_qmodel(model, tmp_path / "q")
    loaded, _, info = load_qmodel(saved)
    assert info["linears"]["model.embed_tokens"]["bits"] == 8 and info["linears"]["lm_head"]["bits"] == 8
    assert torch.equal(our_logits(loaded, ids), our_logits(model, ids))
    assert executorch_checkpoint(loaded).keys() == executorch_checkpoint(model).keys()


def test_agreement_figures():
    ours = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    theirs = torch.tensor([[0.0, 1.0, 0.5], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    result = _agreement(ours, theirs, torch.tensor([0, 1, 0]))
    assert result["top1_agreement"] == pytest.approx(2 / 3)
    assert result["max_abs_logit_diff"] == 2.0
    assert result["ours_next_token_accuracy"] == 1.0 and result["executorch_next_token_accuracy"] == 0.5
    expected_nll = torch.nn.functional.cross_entropy(ours[:2], torch.tensor([1, 0])).item()
    assert result["ours_ppl"] == pytest.approx(math.exp(expected_nll))


# ------------------------------------------------------------------------------------------------------------
# The PTQ entry point
# ------------------------------------------------------------------------------------------------------------


def _ptq(tiny_model_dir, tiny_data_dir, tmp_path, *extra):
    from spinquant.ptq import main

    out = tmp_path / "result.json"
    argv = [
        "--input_model", str(tiny_model_dir), "--data_dir", str(tiny_data_dir), "--model_max_length", "32",
        "--eval_windows", "2", "--result_json", str(out), "--no_progress", *extra,
    ]
    return main(argv), out


def test_ptq_export_to_et_writes_both_checkpoints(tiny_model_dir, tiny_data_dir, tmp_path):
    target = tmp_path / "et" / "executorch_model.bin"
    code, out = _ptq(
        tiny_model_dir, tiny_data_dir, tmp_path, "--w_bits", "4", "--a_bits", "8", "--w_clip", "--w_groupsize", "32",
        "--a_asym", "--rotate", "--w_rtn", "--save_qmodel_path", str(target), "--export_to_et",
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["saved"]["padded_intermediate"] == {"from": 96, "to": 128}
    assert set(torch.load(target, weights_only=True)) >= {"output.scales", "layers.1.feed_forward.w2.weight"}
    loaded, tokenizer, info = load_qmodel(result["saved"]["qmodel"])
    assert tokenizer is not None and info["extra"]["original_model_config"] == {"intermediate_size": 96}


def test_ptq_refuses_unexportable_flags(tiny_model_dir, tiny_data_dir, tmp_path, caplog):
    code, _ = _ptq(tiny_model_dir, tiny_data_dir, tmp_path, "--w_bits", "3", "--rotate", "--w_rtn",
                   "--save_qmodel_path", str(tmp_path / "x.bin"), "--export_to_et")
    assert code == 2 and "--export_to_et needs" in caplog.text and "--a_bits 8" in caplog.text


# ------------------------------------------------------------------------------------------------------------
# ExecuTorch itself (optional extra)
# ------------------------------------------------------------------------------------------------------------


def test_missing_executorch_is_a_clear_error(monkeypatch, tmp_path):
    import importlib.util as util

    from spinquant import export_executorch

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "executorch" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install executorch==1.5.1"):
        export_executorch.run_pte(tmp_path / "model.pte", [1, 2])
    assert export_executorch.main(["--checkpoint", str(tmp_path / "none.bin")]) == 2


def _executorch_eager(paths):
    """ExecuTorch's Llama built by its own loader from our files, with its native R4 injected (as export does)."""
    from omegaconf import OmegaConf

    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401 - registers llama::fast_hadamard_transform
    from executorch.examples.models.llama.model import Llama2Model
    from executorch.examples.models.llama.source_transformation.spin_quant import (
        inject_fast_hadamard_transform_native_for_spin_quant,
    )
    from executorch.extension.llm.export.config.llm_config import LlmConfig
    from spinquant.export_executorch import _executorch_config_file

    config = OmegaConf.merge(OmegaConf.structured(LlmConfig), OmegaConf.load(_executorch_config_file()))
    config.base.checkpoint, config.base.params = str(paths.checkpoint), str(paths.params)
    config.model.use_kv_cache = config.model.use_sdpa_with_kv_cache = False
    config.debug.generate_full_logits = True
    config.export.max_seq_length = config.export.max_context_length = 64
    model = Llama2Model(OmegaConf.to_object(config)).get_eager_model()
    return inject_fast_hadamard_transform_native_for_spin_quant(model).eval()


@requires_executorch
def test_executorch_loads_our_checkpoint_and_computes_our_model(tmp_path):
    model, _ = _exportable()
    paths = save_executorch_checkpoint(model, tmp_path / "et.bin")
    ids = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = _executorch_eager(paths)(ids)
    theirs = (theirs[0] if isinstance(theirs, tuple) else theirs).reshape(48, -1)
    paper = _agreement(our_logits(model, ids), theirs, ids[0])
    mirror_executorch_activations(model)
    mirrored = _agreement(our_logits(model, ids), theirs, ids[0])
    # Same integer weights and the same quantizer placement: what differs is float round-off (torchao quantizes
    # with x * (1/scale) where we divide, RoPE is computed as complex pairs), which moves a few activations by
    # one 8-bit level. On this random model logits span ~+-6; a layout error (wrong permutation, scale, Hadamard)
    # changes them by O(1) everywhere and drops top-1 agreement to chance (~1/300).
    assert mirrored["top1_agreement"] >= 0.95 and mirrored["mean_abs_logit_diff"] < 0.1
    # The paper's evaluation quantizes o_proj's input per head and leaves lm_head's input in float: a bit further.
    assert paper["top1_agreement"] >= 0.85 and paper["mean_abs_logit_diff"] < 0.2


@requires_executorch
@pytest.mark.slow
def test_pte_exported_by_executorch_runs_and_agrees(tmp_path):
    from spinquant.export_executorch import compare_with_pte, export_pte, run_pte

    model, _ = _exportable()
    paths = save_executorch_checkpoint(model, tmp_path / "et.bin")
    pte = export_pte(paths.checkpoint, tmp_path, name="tiny.pte", max_seq_length=64)
    ids = torch.randint(0, 300, (32,), generator=torch.Generator().manual_seed(0))
    theirs = run_pte(pte, ids.tolist())
    assert theirs.shape == (32, 300) and torch.isfinite(theirs).all()
    mirror_executorch_activations(model)
    result = compare_with_pte(model, pte, ids, theirs)
    # XNNPACK's kernels also pick their own per-token activation parameters: same tolerance as above.
    assert result["top1_agreement"] >= 0.95 and result["mean_abs_logit_diff"] < 0.1


# ------------------------------------------------------------------------------------------------------------
# Scripts 31 and 32
# ------------------------------------------------------------------------------------------------------------


def _script(name, tiny_model_dir, tiny_data_dir, tmp_path, *extra, **env):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    environment = {**os.environ, "PYTHON": sys.executable, "SPINQUANT_OUTPUT_DIR": str(tmp_path),
                   "SPINQUANT_DATA_DIR": str(tiny_data_dir), **env}
    return subprocess.run(["bash", str(root / "scripts" / name), str(tiny_model_dir), *extra],
                          env=environment, capture_output=True, text=True, timeout=600)


def test_script_32_runs_the_papers_executorch_ptq(tiny_model_dir, tiny_data_dir, tmp_path):
    proc = _script("32_eval_ptq_executorch.sh", tiny_model_dir, tiny_data_dir, tmp_path, "--w_rtn", "--bf16",
                   "False", "--model_max_length", "32", "--no_progress", COMPARE_TOKENS="0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = tmp_path / "ptq" / f"{tiny_model_dir.name}_W4A8_executorch"
    config = json.loads((folder / "ptq_result.json").read_text())["config"]
    assert (config["w_bits"], config["a_bits"], config["w_groupsize"]) == (4, 8, 32)
    assert config["w_clip"] and config["a_asym"] and config["rotate"] and config["export_to_et"]
    assert (folder / "executorch_model.bin").is_file() and (folder / "executorch_model.params.json").is_file()
    assert (folder / "executorch_model_qmodel" / "qmodel.safetensors").is_file()


def test_script_31_learns_a_w16a8_rotation_with_groups_of_32(tiny_model_dir, tiny_data_dir, tmp_path):
    proc = _script("31_optimize_rotation_executorch.sh", tiny_model_dir, tiny_data_dir, tmp_path, "--max_steps",
                   "1", "--model_max_length", "32", "--bf16", "False", "--no_progress", GLOBAL_BATCH="2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = tmp_path / "rotation" / f"{tiny_model_dir.name}_W16A8KV16_executorch"
    assert (folder / "R.bin").is_file()
    config = json.loads((folder / "optimize_rotation.json").read_text())["config"]
    assert (config["w_bits"], config["a_bits"], config["k_bits"], config["w_groupsize"]) == (16, 8, 16, 32)
    assert config["a_asym"] and config["w_clip"]
