"""Rotation invariance: with quantization off, a fused and rotated model computes the same function.

Tolerances: in float64 the matmuls re-associate with ~1e-15 relative error, but transformers' RMSNorm
computes in float32 whatever the model dtype, so float64 logits (magnitude ~1-10) agree to ~1e-6; we allow
1e-5, far below the O(1) error of any wrong rotation or merge. In float32 (the precision users run at) the same re-association gives ~1e-6
relative error per matmul, compounded over a few layers; logits of magnitude ~1-10 must agree to 1e-3.
"""

from __future__ import annotations

import pytest
import torch

from spinquant.config import QuantConfig, RotationConfig
from spinquant.model import QuantLinear, UnsupportedArchitectureError, check_architecture, get_architecture
from spinquant.quantize import configure_activation_quant, quantize_
from spinquant.rotation import (
    R1_KEY,
    fuse_layer_norms,
    load_rotations,
    make_random_rotations,
    r2_key,
    random_hadamard_matrix,
    random_orthogonal_matrix,
    rotate_,
    save_rotations,
    validate_rotations,
)
from tests.helpers import make_tiny_model

F64_TOL = 1e-5
F32_TOL = 1e-3


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(vocab=300, batch=2, seq=24, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


CASES = [
    pytest.param("llama", dict(kv_heads=4), "hadamard", id="llama-mha-hadamard"),
    pytest.param("llama", dict(kv_heads=2), "random", id="llama-gqa-random"),
    pytest.param("llama", dict(kv_heads=2, tie=True), "hadamard", id="llama-gqa-tied"),
    pytest.param("mistral", dict(kv_heads=1, intermediate=128), "hadamard", id="mistral-mqa"),
    pytest.param("mistral", dict(kv_heads=2), "random", id="mistral-gqa-random"),
]


@pytest.mark.parametrize("arch,kwargs,mode", CASES)
@pytest.mark.parametrize("qk_hadamard", [False, True], ids=["no-R3", "R3"])
def test_rotation_invariance_float64(arch, kwargs, mode, qk_hadamard):
    model = make_tiny_model(arch, dtype=torch.float64, **kwargs)
    ids = _ids()
    reference = _logits(model, ids)
    rotate_(model, RotationConfig(rotate=True, mode=mode, seed=3))
    configure_activation_quant(model, QuantConfig(), qk_hadamard=qk_hadamard)
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=F64_TOL)
    # the rotation really happened: weights changed, norms are ones, R4 is online
    layer = model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert layer.mlp.down_proj.input_hadamard
    assert model.config._attn_implementation.startswith("spinquant_")


@pytest.mark.parametrize("arch,kwargs,mode", CASES)
def test_rotation_invariance_float32(arch, kwargs, mode):
    model = make_tiny_model(arch, dtype=torch.float32, **kwargs)
    ids = _ids()
    reference = _logits(model, ids)
    rotate_(model, RotationConfig(rotate=True, mode=mode, seed=0))
    quantize_(model, QuantConfig(), progress=False)
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=F32_TOL)


def test_tied_embeddings_are_untied_and_rotated_once():
    model = make_tiny_model("llama", tie=True, dtype=torch.float64)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = _ids()
    reference = _logits(model, ids)
    rotate_(model, RotationConfig(rotate=True, seed=1))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=F64_TOL)


def test_loaded_rbin_gives_the_same_model_as_the_rotations_it_holds(tmp_path):
    base = make_tiny_model("llama", dtype=torch.float64)
    ids = _ids()
    reference = _logits(base, ids)
    rotations = make_random_rotations(base, "random", seed=11)
    path = save_rotations(rotations, tmp_path / "R.bin")
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {R1_KEY, r2_key(0), r2_key(1)}
    assert saved[R1_KEY].dtype == torch.float32
    model = make_tiny_model("llama", dtype=torch.float64)
    rotate_(model, RotationConfig(rotate=True, optimized_rotation_path=str(path)))
    quantize_(model, QuantConfig(), progress=False)
    # the file is float32: rotations are orthogonal to ~1e-7, which bounds the logit error
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=1e-5)


def test_no_online_hadamard_variant_is_invariant_too():
    model = make_tiny_model("llama", dtype=torch.float64)
    ids = _ids()
    reference = _logits(model, ids)
    rotate_(model, RotationConfig(rotate=True, online_hadamard=False))
    assert not model.model.layers[0].mlp.down_proj.input_hadamard
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=F64_TOL)


def test_norm_fusion_alone_is_exact():
    model = make_tiny_model("llama", dtype=torch.float64)
    ids = _ids()
    reference = _logits(model, ids)
    fuse_layer_norms(model)
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=F64_TOL)


def test_center_embeddings_is_opt_in_and_changes_the_function():
    model = make_tiny_model("llama", dtype=torch.float64)
    ids = _ids()
    reference = _logits(model, ids)
    fuse_layer_norms(model, center_embeddings=True)
    assert (_logits(model, ids) - reference).abs().max() > 1e-6


@pytest.mark.parametrize("maker", [random_hadamard_matrix, random_orthogonal_matrix])
@pytest.mark.parametrize("n", [16, 64, 96, 576])
def test_random_rotations_are_orthogonal_and_seeded(maker, n):
    r = maker(n, torch.Generator().manual_seed(5))
    torch.testing.assert_close(r.T @ r, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(r, maker(n, torch.Generator().manual_seed(5)))
    assert not torch.equal(r, maker(n, torch.Generator().manual_seed(6)))


def test_rotation_seed_changes_rotations():
    model = make_tiny_model("llama")
    a = make_random_rotations(model, "hadamard", 0)
    b = make_random_rotations(model, "hadamard", 1)
    assert not torch.equal(a[R1_KEY], b[R1_KEY])


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


def _bad_file(tmp_path, rotations):
    path = tmp_path / "R.bin"
    torch.save(rotations, path)
    return path


def test_rbin_with_wrong_shape_names_the_key(tmp_path):
    model = make_tiny_model("llama")
    rotations = make_random_rotations(model, "hadamard", 0)
    rotations[r2_key(1)] = torch.eye(8)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.R2.*shape \(8, 8\).*\(16, 16\)"):
        load_rotations(_bad_file(tmp_path, rotations), model)


def test_rbin_with_missing_layer_names_the_key(tmp_path):
    model = make_tiny_model("llama", layers=3)
    rotations = make_random_rotations(make_tiny_model("llama", layers=2), "hadamard", 0)
    with pytest.raises(ValueError, match=r"missing key 'model\.layers\.2\.self_attn\.R2'.*3 layers.*2"):
        load_rotations(_bad_file(tmp_path, rotations), model)


def test_rbin_not_orthogonal_or_extra_key(tmp_path):
    model = make_tiny_model("llama")
    rotations = make_random_rotations(model, "hadamard", 0)
    rotations[R1_KEY] = rotations[R1_KEY] * 1.5
    with pytest.raises(ValueError, match="'R1' is not orthogonal"):
        validate_rotations(rotations, model)
    rotations = make_random_rotations(model, "hadamard", 0)
    rotations["model.layers.9.self_attn.R2"] = torch.eye(16)
    with pytest.raises(ValueError, match="unexpected key"):
        validate_rotations(rotations, model)


def test_rbin_missing_or_unreadable_file(tmp_path):
    model = make_tiny_model("llama")
    with pytest.raises(FileNotFoundError, match="--optimized_rotation_path"):
        load_rotations(tmp_path / "nope.bin", model)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read"):
        load_rotations(garbage, model)


def test_rotation_path_without_rotate_is_an_error(tmp_path):
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="--rotate"):
        rotate_(model, RotationConfig(rotate=False, optimized_rotation_path=str(tmp_path / "R.bin")))


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM"):
        check_architecture(config)
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        get_architecture(GPT2LMHeadModel(config))


def test_linears_are_wrapped_with_the_same_state_dict_keys():
    model = make_tiny_model("llama")
    keys = set(model.state_dict())
    rotate_(model, RotationConfig(rotate=True))
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert set(model.state_dict()) == keys
