"""Saving and loading the quantized model: bit packing, exact logits after a round trip, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from spinquant.config import QuantConfig, RotationConfig
from spinquant.model import QuantLinear
from spinquant.qmodel import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    QModelError,
    integer_weight,
    load_qmodel,
    pack_levels,
    save_qmodel,
    unpack_levels,
)
from spinquant.quantize import quantize_
from spinquant.rotation import rotate_
from tests.conftest import requires_smollm2
from tests.helpers import make_tiny_model

W4A4KV4 = dict(
    w_bits=4, w_groupsize=32, w_rtn=True, w_clip=True, a_bits=4, a_asym=True,
    k_bits=4, k_asym=True, k_groupsize=16, v_bits=4, v_asym=True, v_groupsize=16,
)


def _tiny(arch="llama", tie=False, dtype=torch.float32, tmp_path=None, **kwargs):
    """A tiny model in ``dtype`` built the way load_model builds one (from_pretrained keeps RoPE's inv_freq in
    float32; casting a float32 model with .to(bfloat16) would round it, which no real run does)."""
    model = make_tiny_model(arch, tie=tie, **kwargs)
    if dtype == torch.float32:
        return model
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "fp32")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=dtype, attn_implementation="sdpa").eval()


def _quantized(quant: dict, rotate: bool, **model_kwargs):
    model = _tiny(**model_kwargs)
    rotate_(model, rotate if isinstance(rotate, RotationConfig) else RotationConfig(rotate=rotate))
    quantize_(model, QuantConfig(**quant), progress=False)
    return model


def _ids(vocab=300, seq=12):
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("cols", [1, 7, 64, 65])
def test_pack_unpack_round_trip(bits, cols):
    levels = torch.randint(0, 2**bits, (5, cols), generator=torch.Generator().manual_seed(bits))
    packed = pack_levels(levels, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (cols * bits + 7) // 8)
    assert torch.equal(unpack_levels(packed, bits, cols).long(), levels)


def test_four_bit_layout_is_two_values_per_byte_low_nibble_first():
    packed = pack_levels(torch.tensor([[1, 2, 15, 0]]), 4)
    assert packed.tolist() == [[0x21, 0x0F]]


def test_pack_rejects_out_of_range_levels():
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_levels(torch.tensor([[8]]), 3)
    with pytest.raises(ValueError, match="bytes per row"):
        unpack_levels(torch.zeros(1, 3, dtype=torch.uint8), 4, 8)


# ------------------------------------------------------------------------------------------------------------
# Exact round trips
# ------------------------------------------------------------------------------------------------------------

CASES = {
    "llama-rotated-w4a4kv4-groups-clip": (dict(arch="llama"), True, W4A4KV4),
    "mistral-rotated-w3-asym-groups": (
        dict(arch="mistral"), True, dict(w_bits=3, w_asym=True, w_groupsize=16, w_rtn=True, a_bits=8, a_asym=True),
    ),
    "llama-tied-unrotated-w8-per-channel": (dict(arch="llama", tie=True), False, dict(w_bits=8, w_rtn=True)),
    "llama-tied-rotated-int8-down-proj": (
        dict(arch="llama", tie=True), True, dict(w_bits=4, w_rtn=True, a_bits=4, int8_down_proj=True, k_bits=4),
    ),
    "mistral-unrotated-w2-asym-kv": (
        dict(arch="mistral"), False, dict(w_bits=2, w_asym=True, w_rtn=True, k_bits=8, v_bits=8, v_groupsize=16),
    ),
    "llama-rotated-fp32-had-weights-only": (
        dict(arch="llama"), RotationConfig(rotate=True, fp32_had=True), dict(w_bits=4, w_rtn=True, w_groupsize=16),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_reproduces_logits_bitwise(case, tmp_path):
    model_kwargs, rotate, quant = CASES[case]
    model = _quantized(quant, rotate, **model_kwargs)
    ids = _ids()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    save_qmodel(model, tmp_path / "q")
    loaded, tokenizer, info = load_qmodel(tmp_path / "q")
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
    # Same integers, scales, dtype and device: the forward is the same computation, so equality is bitwise.
    assert torch.equal(logits, reference)
    assert tokenizer is None
    assert info["quant"]["w_bits"] == quant["w_bits"]
    hadamard = [m.hadamard_fp32 for m in loaded.modules() if isinstance(m, QuantLinear) and m.input_hadamard]
    assert hadamard == [m.hadamard_fp32 for m in model.modules() if isinstance(m, QuantLinear) and m.input_hadamard]


def test_bfloat16_round_trip_is_bitwise(tmp_path):
    model = _quantized(W4A4KV4, True, dtype=torch.bfloat16, tmp_path=tmp_path)
    ids = _ids()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    save_qmodel(model, tmp_path / "q")
    loaded, _, info = load_qmodel(tmp_path / "q")
    assert info["dtype"] == "bfloat16" and loaded.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reference)


def test_gptq_weights_round_trip_exactly(tmp_path):
    """GPTQ (act_order, static groups, clip search) keeps weight_scale/weight_zero as RTN does: saved exactly."""
    import argparse

    from eval_utils.gptq import gptq_config_from_args, gptq_quantize_model

    model = _tiny()
    rotate_(model, RotationConfig(rotate=True))
    quant = QuantConfig(w_bits=4, w_groupsize=32, w_clip=True, a_bits=8, a_asym=True)
    gptq = gptq_config_from_args(argparse.Namespace(nsamples=4, percdamp=0.01, act_order=True, seed=0))
    calibration = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(3))
    gptq_quantize_model(model, calibration, quant, gptq, device="cpu", progress=False)
    quantize_(model, quant, weights=False, progress=False)
    ids = _ids()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    save_qmodel(model, tmp_path / "q")
    loaded, _, _ = load_qmodel(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reference)


def test_loaded_model_is_the_same_wrapper(tmp_path):
    model = _quantized(W4A4KV4, True)
    save_qmodel(model, tmp_path / "q")
    loaded, _, _ = load_qmodel(tmp_path / "q")
    for original, copy in zip(model.model.layers, loaded.model.layers):
        assert isinstance(copy.mlp.down_proj, QuantLinear) and copy.mlp.down_proj.input_hadamard
        assert not copy.mlp.up_proj.input_hadamard
        assert copy.self_attn.qk_hadamard is True  # R3: rotated and K quantized
        assert copy.self_attn.k_quant_spec == original.self_attn.k_quant_spec
        assert copy.self_attn.input_quantizer.spec == original.self_attn.input_quantizer.spec
        assert copy.self_attn.o_proj.input_quantizer.spec == original.self_attn.o_proj.input_quantizer.spec
        assert copy.self_attn.v_proj.output_quantizer.spec == original.self_attn.v_proj.output_quantizer.spec
        assert copy.mlp.down_proj.weight_spec == original.mlp.down_proj.weight_spec
        assert torch.equal(copy.mlp.down_proj.weight_scale, original.mlp.down_proj.weight_scale)
    assert loaded.config._attn_implementation == model.config._attn_implementation
    assert loaded.spinquant_quant == model.spinquant_quant
    assert loaded.spinquant_rotation == model.spinquant_rotation


def test_file_holds_packed_integers_and_a_json_config(tmp_path):
    from safetensors import safe_open

    model = _quantized(dict(w_bits=4, w_groupsize=32, w_rtn=True), True, tie=True)
    save_qmodel(model, tmp_path / "q", source="tiny")
    info = json.loads((tmp_path / "q" / CONFIG_FILE).read_text())
    assert info["rotation"]["rotate"] is True and info["quant"]["w_bits"] == 4
    assert info["source"] == "tiny" and info["tied_embeddings"] is False  # rotation unties
    assert set(info["online_hadamard"]) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    with safe_open(str(tmp_path / "q" / WEIGHTS_FILE), "pt") as handle:
        keys = set(handle.keys())
        qweight = handle.get_tensor("model.layers.0.self_attn.q_proj.qweight")
        scales = handle.get_tensor("model.layers.0.self_attn.q_proj.scales")
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    assert "model.layers.0.self_attn.q_proj.zeros" not in keys  # symmetric: zero points are 0, not stored
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= keys
    assert qweight.dtype == torch.uint8 and qweight.shape == (64, 32)  # 64 inputs x 4 bits = 32 bytes
    assert scales.shape == (64, 2)  # 64 inputs in groups of 32
    # the stored integers are the ones that dequantize to the model's weight
    q = integer_weight(model.model.layers[0].self_attn.q_proj)
    levels = unpack_levels(qweight, 4, 64).float() - 8  # symmetric levels are stored shifted by 2^(b-1)
    assert torch.equal(levels, q)


def test_tied_unrotated_model_stores_the_embedding_once(tmp_path):
    model = _quantized(dict(w_bits=4, w_rtn=True), False, tie=True)
    save_qmodel(model, tmp_path / "q")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / WEIGHTS_FILE), "pt") as handle:
        assert "lm_head.weight" not in set(handle.keys())
    loaded, _, info = load_qmodel(tmp_path / "q")
    assert info["tied_embeddings"] and loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_saving_again_overwrites_atomically(tmp_path, monkeypatch):
    model = _quantized(dict(w_bits=4, w_rtn=True), True)
    save_qmodel(model, tmp_path / "q")
    save_qmodel(model, tmp_path / "q")  # replaces the folder
    before = (tmp_path / "q" / WEIGHTS_FILE).read_bytes()

    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_qmodel(model, tmp_path / "q")
    assert (tmp_path / "q" / WEIGHTS_FILE).read_bytes() == before  # the old model is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no staging folder left behind


def test_weight_off_its_grid_is_refused(tmp_path):
    model = _quantized(dict(w_bits=4, w_rtn=True), False)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(QModelError, match="up_proj.*not on the 4-bit grid"):
        save_qmodel(model, tmp_path / "q")


def test_unquantized_model_is_refused(tmp_path):
    with pytest.raises(QModelError, match="not quantized"):
        save_qmodel(make_tiny_model(), tmp_path / "q")


# ------------------------------------------------------------------------------------------------------------
# Configuration and model mismatches
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_w4(tmp_path):
    model = _quantized(W4A4KV4, True)
    return save_qmodel(model, tmp_path / "q")


def test_matching_flags_load(saved_w4):
    quant = QuantConfig(**{**W4A4KV4, "k_groupsize": 128, "w_clip": False})  # 128 resolves to head_dim 16
    load_qmodel(saved_w4, quant=quant, rotation=RotationConfig(rotate=True, seed=5), dtype=torch.float32)


def test_other_bits_are_refused_naming_each_flag(saved_w4):
    with pytest.raises(QModelError) as err:
        load_qmodel(saved_w4, quant=QuantConfig(**{**W4A4KV4, "w_bits": 3, "a_bits": 8}))
    message = str(err.value)
    assert "--w_bits 4 (command line: 3)" in message and "--a_bits 4 (command line: 8)" in message


def test_rotated_file_without_rotate_is_refused(saved_w4):
    with pytest.raises(QModelError, match=r"--rotate True \(command line: False\)"):
        load_qmodel(saved_w4, quant=QuantConfig(**W4A4KV4), rotation=RotationConfig(rotate=False))


def test_other_dtype_is_refused(saved_w4):
    with pytest.raises(QModelError, match="dtype float32.*--bf16"):
        load_qmodel(saved_w4, dtype=torch.bfloat16)


def test_file_from_another_model_is_refused(saved_w4):
    other = make_tiny_model("llama", layers=3).config
    with pytest.raises(QModelError, match="another model.*num_hidden_layers 2 \\(yours: 3\\)"):
        load_qmodel(saved_w4, model_config=other)
    mistral = make_tiny_model("mistral").config
    with pytest.raises(QModelError, match="architecture LlamaForCausalLM \\(yours: MistralForCausalLM\\)"):
        load_qmodel(saved_w4, model_config=mistral)


def test_damaged_or_foreign_files_are_refused(saved_w4, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = saved_w4 / WEIGHTS_FILE
    tensors = load_file(str(weights))
    del tensors["model.layers.1.mlp.down_proj.scales"]
    save_file(tensors, str(weights), metadata={"format": "spinquant-qmodel", "version": "1"})
    with pytest.raises(QModelError, match="down_proj.scales' is missing"):
        load_qmodel(saved_w4)
    save_file(tensors, str(weights))
    with pytest.raises(QModelError, match="not a spinquant-qmodel weights file"):
        load_qmodel(saved_w4)
    (tmp_path / "et.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="ExecuTorch checkpoint"):
        load_qmodel(tmp_path / "et.bin")
    with pytest.raises(QModelError, match="has no spinquant_qmodel.json"):
        load_qmodel(tmp_path)


def test_shape_mismatch_inside_the_file_is_named(saved_w4):
    info = json.loads((saved_w4 / CONFIG_FILE).read_text())
    info["linears"]["model.layers.0.mlp.up_proj"]["shape"] = [96, 32]
    (saved_w4 / CONFIG_FILE).write_text(json.dumps(info))
    with pytest.raises(QModelError, match="up_proj' is 96x32 in the file but 96x64 in the model"):
        load_qmodel(saved_w4)


# ------------------------------------------------------------------------------------------------------------
# The real model
# ------------------------------------------------------------------------------------------------------------


@requires_smollm2
@pytest.mark.slow
def test_smollm2_round_trip_is_exact(tmp_path):
    from spinquant.model import load_model

    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    rotate_(model, RotationConfig(rotate=True, seed=0))
    quantize_(model, QuantConfig(w_bits=4, w_groupsize=64, w_rtn=True, a_bits=8, a_asym=True), progress=False)
    ids = tokenizer("Quantization with learned rotations keeps the model small.", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    save_qmodel(model, tmp_path / "smol", tokenizer=tokenizer, source="smollm2-135m")
    size = (tmp_path / "smol" / WEIGHTS_FILE).stat().st_size
    loaded, loaded_tokenizer, info = load_qmodel(tmp_path / "smol", model_config=model.config)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reference)
    assert loaded_tokenizer(
        "Quantization with learned rotations keeps the model small.", return_tensors="pt"
    ).input_ids.equal(ids)
    assert len(info["linears"]) == 30 * 7
    # 4-bit decoder weights (~106M values -> ~53 MB packed) plus float32 embedding and lm_head (2 x 28M x 4 B)
    assert size < 330e6


# ------------------------------------------------------------------------------------------------------------
# The PTQ entry point
# ------------------------------------------------------------------------------------------------------------


def _ptq(tiny_model_dir, tiny_data_dir, tmp_path, name, *extra):
    from spinquant.ptq import main

    out = tmp_path / f"{name}.json"
    argv = [
        "--input_model", str(tiny_model_dir), "--data_dir", str(tiny_data_dir), "--model_max_length", "32",
        "--eval_windows", "2", "--result_json", str(out), "--no_progress", *extra,
    ]
    code = main(argv)
    return code, (json.loads(out.read_text()) if code == 0 else None)


FLAGS = ("--w_bits", "4", "--a_bits", "4", "--k_bits", "4", "--a_asym", "--k_asym", "--w_groupsize", "32", "--rotate")


def test_ptq_save_then_load_gives_the_same_perplexity(tiny_model_dir, tiny_data_dir, tmp_path, caplog):
    saved = tmp_path / "qmodel"
    code, first = _ptq(tiny_model_dir, tiny_data_dir, tmp_path, "save", *FLAGS, "--w_rtn", "--w_clip",
                       "--save_qmodel_path", str(saved))
    assert code == 0 and first["saved"]["qmodel"] == str(saved)
    # loading needs neither --w_rtn nor --w_clip (how the weights were found); it runs no rotation, RTN or GPTQ
    code, second = _ptq(tiny_model_dir, tiny_data_dir, tmp_path, "load", *FLAGS, "--load_qmodel_path", str(saved))
    assert code == 0
    assert second["wiki2_ppl"] == first["wiki2_ppl"]
    code, _ = _ptq(tiny_model_dir, tiny_data_dir, tmp_path, "bad", *FLAGS[:-1], "--w_bits", "3",
                   "--load_qmodel_path", str(saved))
    assert code == 2
    assert "--w_bits 4 (command line: 3)" in caplog.text and "--rotate True (command line: False)" in caplog.text


def test_ptq_refuses_save_and_load_together(tiny_model_dir, tiny_data_dir, tmp_path, caplog):
    code, _ = _ptq(tiny_model_dir, tiny_data_dir, tmp_path, "x", "--load_qmodel_path", str(tmp_path / "a"),
                   "--save_qmodel_path", str(tmp_path / "b"))
    assert code == 2 and "exclusive" in caplog.text
