"""Where each quantizer sits, checked by looking at the tensors that flow through a tiny model."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from spinquant.config import QuantConfig, RotationConfig
from spinquant.model import QuantLinear
from spinquant.quantize import quantize_
from spinquant.rotation import rotate_
from tests.helpers import make_tiny_model
from utils.hadamard import hadamard_transform
from utils.quant import QuantSpec, fake_quantize


def _ids(seq=16):
    return torch.randint(0, 300, (2, seq), generator=torch.Generator().manual_seed(0))


def _max_levels(x: torch.Tensor, groupsize: int) -> int:
    """Most distinct values in any (token, group)."""
    groups = x.reshape(-1, groupsize)
    return max(len(torch.unique(row)) for row in groups)


def _capture_inputs(module, store, key):
    def hook(mod, args, kwargs):
        store[key] = (args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))).detach().clone()

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def test_activation_quantizers_sit_where_the_paper_puts_them():
    model = make_tiny_model("llama")
    rotate_(model, RotationConfig(rotate=True))
    quantize_(model, QuantConfig(a_bits=3, a_asym=True, v_bits=2, v_asym=True, v_groupsize=16), progress=False)
    layer = model.model.layers[0]
    seen, outputs = {}, {}
    handles = [
        _capture_inputs(layer.self_attn.q_proj, seen, "q"),
        _capture_inputs(layer.mlp.up_proj, seen, "up"),
        _capture_inputs(layer.self_attn.o_proj, seen, "o"),
        layer.self_attn.v_proj.register_forward_hook(lambda m, a, out: outputs.__setitem__("v", out.detach())),
    ]
    model(input_ids=_ids())
    for handle in handles:
        handle.remove()
    # q/k/v and gate/up read a per-token 3-bit input (<= 8 levels per token over the hidden size)
    assert _max_levels(seen["q"], 64) <= 8
    assert _max_levels(seen["up"], 64) <= 8
    # o_proj's input is quantized again inside o_proj, per head (groups of head_dim = 16)
    o_in = layer.self_attn.o_proj.input_quantizer(seen["o"])
    assert _max_levels(o_in, 16) <= 8
    assert layer.self_attn.o_proj.input_quantizer.spec.groupsize == 16
    # V: 2-bit per token in groups of 16
    assert _max_levels(outputs["v"], 16) <= 4
    # lm_head is untouched
    assert type(model.lm_head) is torch.nn.Linear


def test_down_proj_applies_hadamard_then_quantizes():
    model = make_tiny_model("llama")
    rotate_(model, RotationConfig(rotate=True))
    quantize_(model, QuantConfig(a_bits=4, a_asym=True), progress=False)
    down = model.model.layers[1].mlp.down_proj
    x = torch.randn(3, 5, 96)
    expected = torch.nn.functional.linear(fake_quantize(hadamard_transform(x), QuantSpec(4, True)), down.weight)
    torch.testing.assert_close(down(x), expected, rtol=0, atol=1e-6)


def test_int8_down_proj_keeps_down_proj_at_8_bits():
    model = make_tiny_model("llama")
    quantize_(model, QuantConfig(w_bits=2, w_rtn=True, a_bits=4, int8_down_proj=True), progress=False)
    mlp = model.model.layers[0].mlp
    assert mlp.down_proj.input_quantizer.spec.bits == 8
    assert mlp.down_proj.weight_spec.bits == 8
    assert _max_levels(mlp.up_proj.weight, 64) <= 4
    assert _max_levels(mlp.down_proj.weight, 96) > 4


def test_weights_are_rtn_quantized_per_channel_or_group():
    model = make_tiny_model("llama")
    quantize_(model, QuantConfig(w_bits=3, w_rtn=True, w_asym=True, w_groupsize=32), progress=False)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert _max_levels(q_proj.weight, 32) <= 8
    assert q_proj.weight_scale.shape == (64, 2)
    # embeddings and lm_head are not quantized
    assert _max_levels(model.lm_head.weight, 64) > 8


@pytest.mark.parametrize("rotate", [False, True])
def test_k_is_quantized_after_rope_and_r3(monkeypatch, rotate):
    model = make_tiny_model("llama")
    captured = {}
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx == 0:
            captured["q"], captured["k"] = query.detach(), key.detach()
        return original(module, query, key, value, attention_mask, **kwargs)

    ids = _ids()
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
    reference_model = make_tiny_model("llama")
    reference_model(input_ids=ids)
    q_plain, k_plain = captured["q"], captured["k"]

    if rotate:
        rotate_(model, RotationConfig(rotate=True))
    quantize_(model, QuantConfig(k_bits=2, k_asym=True, k_groupsize=16), progress=False)
    model(input_ids=ids)
    assert model.model.layers[0].self_attn.qk_hadamard is rotate
    # K: 2 bits per token per head (<= 4 levels in every [token, head] row)
    assert _max_levels(captured["k"], 16) <= 4
    if not rotate:
        # without rotation Q is untouched and K is exactly the quantized RoPE'd key
        torch.testing.assert_close(captured["q"], q_plain, rtol=0, atol=1e-6)
        torch.testing.assert_close(captured["k"], fake_quantize(k_plain, QuantSpec(2, True, 16)), rtol=0, atol=1e-5)


def test_kv_groupsize_larger_than_head_dim_means_per_head(caplog):
    model = make_tiny_model("llama")
    resolved = quantize_(model, QuantConfig(k_bits=4, v_bits=4, k_groupsize=128, v_groupsize=128), progress=False)
    assert resolved.k_groupsize == 16 and resolved.v_groupsize == 16
    assert "larger than head_dim" in caplog.text
    with pytest.raises(ValueError, match="--k_groupsize 6 must divide head_dim 16"):
        quantize_(make_tiny_model("llama"), QuantConfig(k_bits=4, k_groupsize=6), progress=False)


def test_quantization_off_changes_nothing():
    model = make_tiny_model("llama")
    ids = _ids()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        quantize_(model, QuantConfig(), progress=False)
        torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=0, atol=1e-6)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)


def test_quantization_changes_outputs_and_more_bits_are_closer():
    ids = _ids()
    reference = make_tiny_model("llama")(input_ids=ids).logits
    errors = {}
    for bits in (3, 8):
        model = make_tiny_model("llama")
        rotate_(model, RotationConfig(rotate=True))
        config = QuantConfig(w_bits=bits, w_rtn=True, a_bits=bits, k_bits=bits, v_bits=bits, a_asym=True)
        quantize_(model, config, progress=False)
        errors[bits] = (model(input_ids=ids).logits - reference).abs().mean().item()
    assert errors[8] < errors[3]
    assert errors[3] > 1e-3


def test_generation_with_cache_runs_quantized():
    model = make_tiny_model("llama")
    rotate_(model, RotationConfig(rotate=True))
    quantize_(model, QuantConfig(w_bits=4, w_rtn=True, a_bits=8, k_bits=4, v_bits=4), progress=False)
    model.generation_config.pad_token_id = 0
    out = model.generate(_ids(seq=4)[:1], max_new_tokens=3, do_sample=False, use_cache=True)
    assert out.shape == (1, 7)
