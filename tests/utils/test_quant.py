"""Quantizers on known values. Exact comparisons where the arithmetic is exact (small integers and halves)."""

from __future__ import annotations

import math

import pytest
import torch

from utils.quant import (
    ActQuantizer,
    QuantSpec,
    WeightQuantizer,
    fake_quantize,
    fake_quantize_weight,
    quantize_weight_rtn,
)


def test_asymmetric_levels_and_zero_point():
    # range [-1, 2] at 2 bits: scale 1, zero 1, levels 0..3 -> values -1, 0, 1, 2 (round half to even: 0.5 -> 0)
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0, 1.4]])
    out = fake_quantize(x, QuantSpec(bits=2, asym=True))
    assert torch.equal(out, torch.tensor([[-1.0, 0.0, 0.0, 2.0, 1.0]]))


def test_symmetric_levels_use_negative_extra_level():
    # 4-bit symmetric: maxq 7, scale = max|x| / 7 = 1; -8 is representable but only reached by clipping
    x = torch.tensor([[-3.5, 7.0, 0.0, 2.6]])
    out = fake_quantize(x, QuantSpec(bits=4, asym=False))
    assert torch.equal(out, torch.tensor([[-4.0, 7.0, 0.0, 3.0]]))


def test_range_always_includes_zero():
    # all-positive row: xmin is taken as 0, so scale = 3 / 3 = 1 at 2 bits asymmetric
    x = torch.tensor([[1.0, 2.0, 3.0]])
    out = fake_quantize(x, QuantSpec(bits=2, asym=True))
    assert torch.equal(out, x)


def test_zero_row_stays_zero():
    for asym in (True, False):
        out = fake_quantize(torch.zeros(2, 8), QuantSpec(bits=4, asym=asym))
        assert torch.equal(out, torch.zeros(2, 8))


def test_groups_have_their_own_scales():
    # two groups of 2: [0, 1] and [0, 100] at 2 bits asym; grouped keeps 1 exact, per-row loses it
    x = torch.tensor([[0.0, 1.0, 0.0, 99.0]])
    grouped = fake_quantize(x, QuantSpec(bits=2, asym=True, groupsize=2))
    per_row = fake_quantize(x, QuantSpec(bits=2, asym=True))
    assert grouped[0, 1] == 1.0
    assert per_row[0, 1] == 0.0
    with pytest.raises(ValueError, match="group size 3"):
        fake_quantize(x, QuantSpec(bits=2, groupsize=3))


def test_clip_ratio_shrinks_the_range():
    # clip 0.5 on [0, 4] at 2 bits asym: range [0, 2], scale 2/3; 4 clips to 2
    x = torch.tensor([[0.0, 4.0]])
    out = fake_quantize(x, QuantSpec(bits=2, asym=True, clip_ratio=0.5))
    assert out[0, 1].item() == pytest.approx(2.0, abs=1e-6)


def test_per_token_rows_are_independent():
    x = torch.randn(5, 3, 16)
    full = fake_quantize(x, QuantSpec(bits=3, asym=True))
    one = fake_quantize(x[2:3, 1:2], QuantSpec(bits=3, asym=True))
    assert torch.equal(full[2:3, 1:2], one)


def test_error_bounded_by_half_a_step():
    # round to nearest: |Q(x) - x| <= scale / 2 (plus float32 round-off) for values inside the range
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    spec = QuantSpec(bits=4, asym=True)
    out = fake_quantize(x, spec)
    xmin = x.amin(1, keepdim=True).clamp(max=0)
    xmax = x.amax(1, keepdim=True).clamp(min=0)
    scale = (xmax - xmin) / spec.maxq
    assert ((out - x).abs() <= scale / 2 + scale * 1e-5 + 1e-6).all()
    assert len(torch.unique(out[0])) <= 16


def test_straight_through_gradient_is_identity():
    x = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(4, 8)
    (fake_quantize(x, QuantSpec(bits=3, asym=True, groupsize=4)) * weight).sum().backward()
    assert torch.equal(x.grad, weight)
    w = torch.randn(6, 8, requires_grad=True)
    (fake_quantize_weight(w, QuantSpec(bits=3), clip_search=True) * 2).sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 2.0))


def test_half_precision_input_keeps_dtype():
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    out = fake_quantize(x, QuantSpec(bits=4, asym=True))
    assert out.dtype == torch.bfloat16
    module = ActQuantizer(QuantSpec(bits=16))
    assert module(x) is x


def _paper_clip_search(w: torch.Tensor, bits: int, asym: bool) -> torch.Tensor:
    """Independent loop-form reference of the paper's search; returns the dequantized weight."""
    maxq = 2**bits - 1 if asym else 2 ** (bits - 1) - 1
    xmin = w.amin(1).clamp(max=0)
    xmax = w.amax(1).clamp(min=0)
    best = torch.full((w.shape[0],), math.inf, dtype=w.dtype)
    result = torch.zeros_like(w)
    for i in range(80):
        p = 1 - i / 100
        lo, hi = p * xmin, p * xmax
        if asym:
            scale = ((hi - lo).clamp(min=1e-5) / maxq).unsqueeze(1)
            zero = torch.round(-lo.unsqueeze(1) / scale)
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            deq = scale * (q - zero)
        else:
            top = torch.maximum(lo.abs(), hi).clamp(min=1e-5)
            scale = (top / maxq).unsqueeze(1)
            deq = scale * torch.clamp(torch.round(w / scale), -(maxq + 1), maxq)
        err = (deq - w).abs().pow(2.4).sum(1)
        better = err < best
        best = torch.where(better, err, best)
        result[better] = deq[better]
    return result


@pytest.mark.parametrize("asym", [True, False])
def test_clip_search_matches_the_papers_loop(asym):
    torch.manual_seed(1)
    w = torch.randn(32, 64, dtype=torch.float64)
    w[:, 0] *= 8  # outliers make clipping worthwhile
    deq, scale, zero = quantize_weight_rtn(w, QuantSpec(bits=3, asym=asym), clip_search=True)
    # float64 both ways: identical choices, identical values up to round-off
    torch.testing.assert_close(deq, _paper_clip_search(w, 3, asym), rtol=0, atol=1e-12)
    assert scale.shape == (32, 1) and zero.shape == (32, 1)


def test_clip_search_never_worse_than_no_clip():
    torch.manual_seed(2)
    w = torch.randn(16, 128)
    w[:, :2] *= 10
    plain, _, _ = quantize_weight_rtn(w, QuantSpec(bits=4, asym=True))
    clipped, _, _ = quantize_weight_rtn(w, QuantSpec(bits=4, asym=True), clip_search=True)
    err = lambda q: (q - w).abs().pow(2.4).sum(1)  # noqa: E731
    assert (err(clipped) <= err(plain) * (1 + 1e-6)).all()
    assert (err(clipped) < err(plain)).any()


def test_weight_quantizer_configure_find_params_quantize():
    quantizer = WeightQuantizer()
    quantizer.configure(bits=4, asym=True, groupsize=-1, clip_search=False)
    w = torch.tensor([[-1.0, 0.0, 14.0]])
    with pytest.raises(RuntimeError):
        quantizer.quantize(w)
    quantizer.find_params(w)
    assert quantizer.scale.item() == pytest.approx(1.0)
    assert quantizer.zero.item() == 1.0
    assert torch.equal(quantizer.quantize(w), w)
    assert torch.equal(quantizer.quantize_int(w), torch.tensor([[0.0, 1.0, 15.0]]))


def test_grouped_weight_rtn_shapes_and_values():
    w = torch.tensor([[0.0, 1.0, 0.0, 3.0]])
    deq, scale, zero = quantize_weight_rtn(w, QuantSpec(bits=2, asym=True, groupsize=2))
    assert scale.shape == (1, 2)
    assert torch.equal(deq, w)
    with pytest.raises(ValueError, match="--w_groupsize"):
        quantize_weight_rtn(w, QuantSpec(bits=2, groupsize=3))


def test_spec_validation():
    with pytest.raises(ValueError):
        QuantSpec(bits=0)
    with pytest.raises(ValueError):
        QuantSpec(bits=4, clip_ratio=1.5)
    assert QuantSpec(bits=4, asym=True).maxq == 15
    assert QuantSpec(bits=4).maxq == 7
    assert not QuantSpec(bits=16).enabled
