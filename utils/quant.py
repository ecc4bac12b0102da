"""Quantizers: the one home of every quantize-dequantize formula in the project.

The formulas follow the SpinQuant paper's code (see README, "Faithfulness"):

* asymmetric: levels 0..2^b-1, ``scale = (xmax - xmin) / (2^b - 1)``, ``zero = round(-xmin / scale)``;
* symmetric: levels -2^(b-1)..2^(b-1)-1, ``scale = max(|xmin|, xmax) / (2^(b-1) - 1)``;
* ranges always include 0 (``xmin = min(min(x), 0)``, ``xmax = max(max(x), 0)``), a row of zeros uses [-1, 1];
* activations are quantized dynamically per token (per row of the last dimension, optionally in groups);
* weights are quantized per output channel (optionally in groups along the input), with an optional grid
  search of the clip ratio (``--w_clip``) minimising ``sum |Q(w) - w|^2.4`` per row.

Every quantize-dequantize is differentiable through a straight-through estimator (identity gradient for the
input, no gradient for the scales), which rotation learning relies on.

In the style of IST-DASLab/gptq, :class:`WeightQuantizer` is configured once (``configure``), computes its
parameters from a weight (``find_params``) and then quantizes (``quantize``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "QuantSpec",
    "ActQuantizer",
    "WeightQuantizer",
    "compute_scale_zero",
    "fake_quantize",
    "quantize_to_int",
    "dequantize",
    "round_ste",
    "CLIP_SEARCH_GRID",
    "CLIP_SEARCH_MAX_SHRINK",
    "CLIP_SEARCH_NORM",
]

# The paper's clip search: shrink factors p = 1 - i / 100 for i in 0..79, error norm 2.4.
CLIP_SEARCH_GRID = 100
CLIP_SEARCH_MAX_SHRINK = 0.8
CLIP_SEARCH_NORM = 2.4
# Weight ranges are kept at least this wide so a constant row never yields a zero scale.
WEIGHT_MIN_RANGE = 1e-5


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize to: bits, symmetric or not, group size along the last dimension, clip ratio.

    ``bits >= 16`` means "leave in floating point". ``groupsize <= 0`` means one group per row.
    """

    bits: int = 16
    asym: bool = False
    groupsize: int = -1
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.bits < 1:
            raise ValueError(f"bits must be >= 1, got {self.bits}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"clip ratio must be in (0, 1], got {self.clip_ratio}")

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    @property
    def maxq(self) -> int:
        """Largest level: 2^b - 1 (asymmetric) or 2^(b-1) - 1 (symmetric)."""
        return 2**self.bits - 1 if self.asym else 2 ** (self.bits - 1) - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def compute_scale_zero(
    xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec, min_range: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from a (clipped) range; both detached-friendly, computed in float32 or wider.

    ``xmin``/``xmax`` must already include 0 (``xmin <= 0 <= xmax``).
    """
    maxq = spec.maxq
    if spec.asym:
        both_zero = (xmin == 0) & (xmax == 0)
        xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
        xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
        span = xmax - xmin
        if min_range > 0:
            span = span.clamp(min=min_range)
        scale = span / maxq
        zero = torch.round(-xmin / scale)
    else:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmax = torch.where(xmax == 0, torch.ones_like(xmax), xmax)
        if min_range > 0:
            xmax = xmax.clamp(min=min_range)
        scale = xmax / maxq
        zero = torch.zeros_like(scale)
    return scale, zero


def quantize_to_int(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer levels (as a float tensor): [0, 2^b-1] asymmetric, [-2^(b-1), 2^(b-1)-1] symmetric."""
    if spec.asym:
        return torch.clamp(torch.round(x / scale) + zero, 0, spec.maxq)
    return torch.clamp(torch.round(x / scale), -(spec.maxq + 1), spec.maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def _fake_quant_with_params(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Quantize-dequantize with given parameters; identity gradient for x (the paper's STE, no clip mask)."""
    xq = dequantize(quantize_to_int(x.detach(), scale, zero, spec), scale, zero)
    return x + (xq - x).detach() if x.requires_grad else xq


def _row_range(x: torch.Tensor, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row range including zero, shrunk by the clip ratio (the paper's activation formula)."""
    zeros = torch.zeros((), dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.amin(dim=-1, keepdim=True), zeros)
    xmax = torch.maximum(x.amax(dim=-1, keepdim=True), zeros)
    if clip_ratio != 1.0:
        xmin, xmax = xmin * clip_ratio, xmax * clip_ratio
    return xmin, xmax


def _split_groups(x: torch.Tensor, groupsize: int, what: str) -> torch.Tensor:
    """View the last dimension as (n_groups, groupsize)."""
    n = x.shape[-1]
    if groupsize <= 0 or groupsize == n:
        return x.unsqueeze(-2)
    if n % groupsize:
        raise ValueError(f"{what}: group size {groupsize} does not divide the dimension {n}")
    return x.reshape(*x.shape[:-1], n // groupsize, groupsize)


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Dynamic per-row (per-token) quantize-dequantize of the last dimension, in groups if asked.

    Scales are computed in float32 (or float64 for float64 input) from the detached input; the result keeps
    x's dtype. Gradient: identity (straight-through).
    """
    if not spec.enabled:
        return x
    shape = x.shape
    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xg = _split_groups(x, spec.groupsize, "activation quantizer")
    xf = xg.detach().to(work_dtype)
    xmin, xmax = _row_range(xf, spec.clip_ratio)
    scale, zero = compute_scale_zero(xmin, xmax, spec)
    xq = dequantize(quantize_to_int(xf, scale, zero, spec), scale, zero).to(x.dtype)
    if x.requires_grad:
        xq = xg + (xq - xg).detach()
    return xq.reshape(shape)


class ActQuantizer(torch.nn.Module):
    """Dynamic per-token activation quantizer (a module so it shows in ``print(model)`` and can be swapped)."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, self.spec)

    def extra_repr(self) -> str:
        s = self.spec
        return f"bits={s.bits}, asym={s.asym}, groupsize={s.groupsize}, clip_ratio={s.clip_ratio}"


class WeightQuantizer:
    """Round-to-nearest weight quantizer, per output channel or per group along the input dimension.

    ``configure`` once, ``find_params(w)`` (optionally with the paper's clip-ratio search), then ``quantize``.
    ``find_params`` accepts a 2-D ``[rows, cols]`` weight or a grouped ``[rows, n_groups, groupsize]`` view;
    scale and zero have one entry per row (per group).
    """

    def __init__(self, spec: QuantSpec | None = None, clip_search: bool = False) -> None:
        self.spec = spec or QuantSpec()
        self.clip_search = clip_search
        self.scale: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None

    def configure(self, bits: int, asym: bool = False, groupsize: int = -1, clip_search: bool = False) -> None:
        self.spec = QuantSpec(bits=bits, asym=asym, groupsize=groupsize)
        self.clip_search = clip_search

    @property
    def ready(self) -> bool:
        return self.scale is not None

    @torch.no_grad()
    def find_params(self, w: torch.Tensor) -> None:
        """Per-row (last dimension) scale and zero; with clip search, the shrink factor minimising the error."""
        spec = self.spec
        work = w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32)
        xmin, xmax = _row_range(work, 1.0)
        scale, zero = compute_scale_zero(xmin, xmax, spec, min_range=WEIGHT_MIN_RANGE)
        if self.clip_search:
            scale, zero = _search_clip(work, xmin, xmax, spec, scale, zero)
        self.scale, self.zero = scale, zero

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize with the found parameters; identity gradient; keeps w's dtype."""
        if not self.ready:
            raise RuntimeError("WeightQuantizer.quantize called before find_params")
        work_dtype = self.scale.dtype
        wq = _fake_quant_with_params(w.to(work_dtype), self.scale, self.zero, self.spec)
        return wq.to(w.dtype)

    def quantize_int(self, w: torch.Tensor) -> torch.Tensor:
        """Integer levels of w with the found parameters (for packing and export)."""
        if not self.ready:
            raise RuntimeError("WeightQuantizer.quantize_int called before find_params")
        return quantize_to_int(w.detach().to(self.scale.dtype), self.scale, self.zero, self.spec)


def _search_clip(
    w: torch.Tensor,
    xmin: torch.Tensor,
    xmax: torch.Tensor,
    spec: QuantSpec,
    scale: torch.Tensor,
    zero: torch.Tensor,
    max_elements: int = 1 << 26,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's clip search, vectorised over several shrink factors at a time.

    For each row, try p = 1 - i/100 (i = 0..79) on both ends of the range and keep the p with the smallest
    ``sum |Q(w) - w|^2.4``; ties keep the larger p (the paper's loop keeps the first, strict improvement).
    Candidates are evaluated ``chunk`` at a time, bounded so that about ``max_elements`` values are live.
    """
    n_candidates = int(CLIP_SEARCH_MAX_SHRINK * CLIP_SEARCH_GRID)
    ps = 1.0 - torch.arange(n_candidates, dtype=w.dtype, device=w.device) / CLIP_SEARCH_GRID
    chunk = max(1, min(n_candidates, max_elements // max(1, w.numel())))
    best_err = torch.full_like(xmin, math.inf)
    best_scale, best_zero = scale.clone(), zero.clone()
    extra = (1,) * xmin.dim()
    for start in range(0, n_candidates, chunk):
        p = ps[start : start + chunk].view(-1, *extra)  # [c, ..., 1]
        s, z = compute_scale_zero(p * xmin, p * xmax, spec, min_range=WEIGHT_MIN_RANGE)
        err = dequantize(quantize_to_int(w, s, z, spec), s, z).sub_(w).abs_().pow_(CLIP_SEARCH_NORM)
        err = err.sum(dim=-1, keepdim=True)  # [c, ..., 1]
        for j in range(err.shape[0]):
            better = err[j] < best_err
            best_err = torch.where(better, err[j], best_err)
            best_scale = torch.where(better, s[j], best_scale)
            best_zero = torch.where(better, z[j], best_zero)
    return best_scale, best_zero


def quantize_weight_rtn(
    weight: torch.Tensor, spec: QuantSpec, clip_search: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN-quantize a ``[out, in]`` weight; returns (dequantized weight in weight's dtype, scale, zero).

    scale and zero have shape ``[out, n_groups]`` (n_groups = 1 without groups).
    """
    out_features, in_features = weight.shape
    grouped = _split_groups(weight, spec.groupsize, "--w_groupsize")  # [out, g, gs]
    quantizer = WeightQuantizer(spec, clip_search=clip_search)
    quantizer.find_params(grouped)
    deq = quantizer.quantize(grouped).reshape(out_features, in_features)
    return deq, quantizer.scale.squeeze(-1), quantizer.zero.squeeze(-1)


def fake_quantize_weight(weight: torch.Tensor, spec: QuantSpec, clip_search: bool = False) -> torch.Tensor:
    """Differentiable RTN fake quantization of a weight (scales from the detached weight)."""
    if not spec.enabled:
        return weight
    grouped = _split_groups(weight, spec.groupsize, "--w_groupsize")
    quantizer = WeightQuantizer(spec, clip_search=clip_search)
    quantizer.find_params(grouped)
    return quantizer.quantize(grouped).reshape(weight.shape)


__all__ += ["quantize_weight_rtn", "fake_quantize_weight"]
