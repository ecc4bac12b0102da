"""The rotation-learning network: same function as the PTQ wrapper, gradients only to R1/R2, the per-step cache.

Tolerances: in float64, the training network and the PTQ wrapper do the same float64 arithmetic in a different
order; logits (magnitude ~1-10) agree to ~1e-14, and a quantization level can only flip if a value sits within
~1e-15 of a rounding boundary, which these seeds do not hit: we allow 1e-9. Gradients of the cached path (weights
computed once, gradient folded into R1/R2 by a hook) and the on-the-fly path (plain autograd) are the same sums in
a different order. R1/R2 and their gradients are float32 whatever the model dtype, so contributions are summed
in float32: ~1e-7 of the largest gradient entry in a float64 model (we allow 1e-6), ~1e-5 in a float32 model,
whose activations carry float32 rounding too (we allow 1e-4).
"""

from __future__ import annotations

import copy

import pytest
import torch

from spinquant.config import QuantConfig, RotationConfig
from spinquant.quantize import quantize_
from spinquant.rotation import fuse_layer_norms, make_random_rotations, merge_rotations
from tests.helpers import make_tiny_model
from train_utils.rotation_model import (
    INPUT_SIDE,
    O_PROJ,
    OUTPUT_SIDE,
    V_PROJ,
    CheckpointedLayer,
    RotatedQuantWeight,
    build_rotation_network,
    rotate_weight,
)

W4A4KV4 = QuantConfig(
    w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_clip=True, a_asym=True, k_asym=True, v_asym=True,
    k_groupsize=16, v_groupsize=16,
)


def _ids(batch=2, seq=24, seed=0, vocab=300):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _ptq_model(base, rotations, quant):
    model = copy.deepcopy(base)
    fuse_layer_norms(model)
    merge_rotations(model, rotations, online_hadamard=True)
    model.spinquant_rotation = RotationConfig(rotate=True)
    quantize_(model, quant, progress=False)
    return model


def _grads(network, ids):
    network.zero_grad(set_to_none=True)
    with network.step_weights():
        loss, count = network(ids)
        (loss / count).backward()
    return [p.grad.detach().clone() for p in network.trainable_parameters()], (loss / count).item()


@pytest.mark.parametrize("arch,kwargs", [("llama", dict(kv_heads=2)), ("mistral", dict(kv_heads=1, tie=True))])
@pytest.mark.parametrize("cache", [True, False], ids=["cached", "on-the-fly"])
def test_network_computes_the_ptq_model_for_the_same_rotations(arch, kwargs, cache):
    base = make_tiny_model(arch, dtype=torch.float64, **kwargs)
    rotations = make_random_rotations(base, "hadamard", seed=3)
    reference = _ptq_model(base, rotations, W4A4KV4)
    network = build_rotation_network(copy.deepcopy(base), W4A4KV4, rotations, cache_weights=cache)
    ids = _ids()
    network.eval()
    with torch.no_grad(), network.step_weights():
        logits = network.model(input_ids=ids).logits
        expected = reference(input_ids=ids).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-9)
    # and the quantized weights are the ones RTN gives the merged weights
    effective = network.effective_weights()
    layer = reference.model.layers[1]
    torch.testing.assert_close(effective["model.layers.1.self_attn.o_proj"], layer.self_attn.o_proj.weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(effective["model.layers.1.mlp.down_proj"], layer.mlp.down_proj.weight, rtol=0, atol=1e-12)


def test_loss_is_the_causal_lm_cross_entropy():
    base = make_tiny_model("llama", dtype=torch.float64)
    network = build_rotation_network(base, QuantConfig(), make_random_rotations(base, "hadamard", 0))
    network.loss_chunk_tokens = 7  # several chunks, one ragged
    ids = _ids(batch=3, seq=17)
    network.eval()
    with torch.no_grad():
        loss, count = network(ids)
        hf = network.model(input_ids=ids, labels=ids).loss
    assert count == 3 * 16
    torch.testing.assert_close(loss / count, hf, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_cached_weights_give_the_same_gradient_as_autograd_through_every_forward(dtype, rtol):
    base = make_tiny_model("llama", dtype=dtype)
    rotations = make_random_rotations(base, "hadamard", seed=1)
    cached = build_rotation_network(copy.deepcopy(base), W4A4KV4, rotations, cache_weights=True)
    plain = build_rotation_network(copy.deepcopy(base), W4A4KV4, rotations, cache_weights=False)
    ids = _ids(batch=2, seq=20)
    grads_cached, loss_cached = _grads(cached, ids)
    grads_plain, loss_plain = _grads(plain, ids)
    assert loss_cached == pytest.approx(loss_plain, rel=1e-12)
    assert len(grads_cached) == 1 + 2  # R1 and one R2 per layer
    for a, b in zip(grads_cached, grads_plain):
        scale = b.abs().max()
        assert scale > 0
        torch.testing.assert_close(a, b, rtol=0, atol=rtol * scale)


def test_gradient_checkpointing_and_accumulation_do_not_change_the_gradient():
    base = make_tiny_model("llama", dtype=torch.float64)
    rotations = make_random_rotations(base, "hadamard", seed=2)
    ids = _ids(batch=4, seq=16)
    with_ckpt = build_rotation_network(copy.deepcopy(base), W4A4KV4, rotations, gradient_checkpointing=True)
    without = build_rotation_network(copy.deepcopy(base), W4A4KV4, rotations, gradient_checkpointing=False)
    assert isinstance(with_ckpt.model.model.layers[0], CheckpointedLayer)
    assert not isinstance(without.model.model.layers[0], CheckpointedLayer)
    reference, _ = _grads(without, ids)
    checkpointed, _ = _grads(with_ckpt, ids)

    # two micro-batches sharing one weight computation: gradients add up to the full-batch gradient
    with_ckpt.zero_grad(set_to_none=True)
    with with_ckpt.step_weights():
        for half in (ids[:2], ids[2:]):
            loss, _ = with_ckpt(half)
            (loss / (4 * 15)).backward()
    accumulated = [p.grad.clone() for p in with_ckpt.trainable_parameters()]
    for a, b, c in zip(reference, checkpointed, accumulated):
        scale = a.abs().max()
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6 * scale)  # float32 gradient sums, see the docstring
        torch.testing.assert_close(c, a, rtol=0, atol=1e-6 * scale)


def test_only_the_rotations_are_trainable_and_the_model_is_untouched_by_a_step():
    base = make_tiny_model("llama")
    network = build_rotation_network(base, W4A4KV4, make_random_rotations(base, "hadamard", 0))
    frozen = {name: p.detach().clone() for name, p in network.model.named_parameters()}
    assert not any(p.requires_grad for p in network.model.parameters())
    trainable = network.trainable_parameters()
    assert [tuple(p.shape) for p in trainable] == [(64, 64), (16, 16), (16, 16)]
    assert all(p.dtype == torch.float32 and p.requires_grad for p in trainable)
    _grads(network, _ids())
    assert all(p.grad is None for p in network.model.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    for name, p in network.model.named_parameters():
        assert torch.equal(p, frozen[name]), name
    # the cache is released after the step: nothing holds the quantized weights
    assert all(linear.param.cached is None for linear in network._linears)


def test_bucketed_quantization_equals_quantizing_each_weight_alone():
    base = make_tiny_model("llama", dtype=torch.float32)
    network = build_rotation_network(base, W4A4KV4, make_random_rotations(base, "random", 4))
    alone = network.effective_weights()
    with network.step_weights():
        together = {linear.name: linear.param.cached.detach().clone() for linear in network._linears}
    assert together.keys() == alone.keys()
    for name in alone:
        assert torch.equal(together[name], alone[name]), name


def test_weights_are_quantized_on_the_grid_and_lm_head_and_embeddings_are_not():
    base = make_tiny_model("llama", dtype=torch.float32)
    network = build_rotation_network(base, W4A4KV4, make_random_rotations(base, "hadamard", 0))
    for name, weight in network.effective_weights().items():
        assert all(row.unique().numel() <= 16 for row in weight), name  # 4-bit: at most 16 levels per row
    arch_head = network.model.lm_head
    assert not hasattr(arch_head, "parametrizations") and not hasattr(network.model.model.embed_tokens, "parametrizations")


def test_rotate_weight_kinds_match_explicit_formulas():
    g = torch.Generator().manual_seed(0)
    r1 = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0]
    r2 = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    w_in = torch.randn(12, 8, generator=g, dtype=torch.float64)
    w_out = torch.randn(8, 12, generator=g, dtype=torch.float64)
    torch.testing.assert_close(rotate_weight(w_in, INPUT_SIDE, r1), w_in @ r1)
    torch.testing.assert_close(rotate_weight(w_out, OUTPUT_SIDE, r1), r1.T @ w_out)
    block_r2 = torch.block_diag(r2, r2, r2)
    torch.testing.assert_close(rotate_weight(w_in, V_PROJ, r1, r2, head_dim=4), block_r2.T @ w_in @ r1)
    torch.testing.assert_close(rotate_weight(w_out, O_PROJ, r1, r2, head_dim=4), r1.T @ w_out @ block_r2)
    with pytest.raises(ValueError, match="unknown weight kind"):
        rotate_weight(w_in, "sideways", r1)


def test_w16_keeps_weights_in_floating_point():
    base = make_tiny_model("llama", dtype=torch.float64)
    rotations = make_random_rotations(base, "hadamard", 0)
    quant = QuantConfig(a_bits=4, k_bits=4, v_bits=4, a_asym=True, k_asym=True, v_asym=True, k_groupsize=16, v_groupsize=16)
    network = build_rotation_network(copy.deepcopy(base), quant, rotations)
    params = [m for m in network.model.modules() if isinstance(m, RotatedQuantWeight)]
    assert params and not any(p.spec.enabled for p in params)
    reference = _ptq_model(base, rotations, quant)
    ids = _ids()
    network.eval()
    with torch.no_grad():
        torch.testing.assert_close(network.model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-9)


def test_no_had_variant_matches_ptq_without_online_hadamards():
    base = make_tiny_model("llama", dtype=torch.float64)
    rotations = make_random_rotations(base, "hadamard", seed=5)
    reference = copy.deepcopy(base)
    fuse_layer_norms(reference)
    merge_rotations(reference, rotations, online_hadamard=False)
    reference.spinquant_rotation = RotationConfig(rotate=True, online_hadamard=False)
    quantize_(reference, W4A4KV4, progress=False)
    network = build_rotation_network(copy.deepcopy(base), W4A4KV4, rotations, online_hadamard=False)
    assert not network.model.model.layers[0].layer.mlp.down_proj.input_hadamard
    ids = _ids()
    network.eval()
    with torch.no_grad():
        torch.testing.assert_close(network.model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-9)
