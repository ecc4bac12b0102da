"""Triton kernels for the online Hadamard transform, alone and fused with per-token quantization.

Imported lazily by :mod:`utils.hadamard` (its "triton" backend) only when Triton imports and CUDA is available, or
when ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by the tests). Callers use
``utils.hadamard.hadamard_transform`` / ``utils.hadamard.hadamard_quantize``, never this module.

What it computes: exactly ``utils.hadamard``'s definition, ``y = x @ kron(H_m, S_p) / sqrt(n)`` over the last
dimension (``n = m * p``, ``S_p`` the Sylvester matrix in natural order, ``H_m`` a +-1 factor of the Hadamard
module). Viewing one row as an ``m x p`` matrix ``X``: ``y = H_m^T X S_p / sqrt(n)``.

Design (memory bound: each element is read once and written once):

* one program owns whole rows (``ROWS`` rows when ``m == 1``, one row when ``m > 1``), loaded once into registers
  and computed in float32;
* the ``m x m`` factor first (``m > 1``): ``tl.dot`` of the +-1 factor (zero-padded to a power of two ``M_PAD``)
  with the raw input tile, in chunks of 16 blocks loaded straight from memory, in the input's dtype with float32
  accumulation (tensor cores for 16-bit input, FMA for float32), so every product is exact; padded blocks are
  masked to zero and never stored;
* the Sylvester part: log2(p) radix-2 butterfly stages on the register tile, each written as
  reshape -> permute -> split -> add/sub -> join, in the same stage order as the PyTorch backend. Triton maps the
  size-2 axis of stages whose partners sit in one thread to plain register adds, those within a warp to shuffles
  and only the remaining ones to a shared-memory exchange, so the kernel does ~log2(p) additions per element and
  few data exchanges: far below the memory time;
* the fused variant quantizes the transformed tile before the single store (per row, or per group along the last
  dimension), with the formulas of :func:`utils.quant.fake_quantize`: IEEE division (``div_rn``), round half to
  even, the same clamp and dequantization, scales in float32.

Autograd: the transform is orthogonal, so the backward of ``x -> x @ H`` is ``g -> g @ H^T``: the same kernel with
``H_m`` in place of ``H_m^T`` (``S_p`` is symmetric). The fused quantizer uses the straight-through estimator, so its
backward is the transform's backward as well.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .quant import QuantSpec

__all__ = [
    "MAX_POWER_OF_TWO",
    "supports",
    "supports_quantize",
    "hadamard_transform",
    "hadamard_quantize",
    "LaunchConfig",
    "launch_config",
    "candidate_configs",
    "autotune_enabled",
    "tuned_configs",
    "kernel_arguments",
    "launch",
    "AUTOTUNE_ENV_VAR",
]

MAX_POWER_OF_TWO = 2**15  # largest Sylvester part handled in one program (the row lives in registers)
_MIN_DOT = 16  # tl.dot needs every dimension >= 16
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Device functions
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _butterflies(v, M: tl.constexpr, R: tl.constexpr, LOG_R: tl.constexpr):
    """v @ S_R over the last axis of an [M, R] float32 tile: radix-2 stages of half-width 1, 2, 4, ..."""
    for stage in tl.static_range(LOG_R):
        pairs = tl.reshape(v, [M, R // (2 << stage), 2, 1 << stage])
        pairs = tl.permute(pairs, [0, 1, 3, 2])
        first, second = tl.split(pairs)
        pairs = tl.join(first + second, first - second)
        pairs = tl.permute(pairs, [0, 1, 3, 2])
        v = tl.reshape(pairs, [M, R])
    return v


@triton.jit
def _sylvester_bits(y, A: tl.constexpr, P: tl.constexpr, LOW: tl.constexpr, BITS: tl.constexpr):
    """The butterfly stages of index bits LOW .. LOW + BITS - 1 of an [A, P] tile: those bits are moved to a
    trailing axis of size 2^BITS (one data exchange for the group, where Triton can), transformed, moved back."""
    v = tl.reshape(y, [A, P >> (LOW + BITS), 1 << BITS, 1 << LOW])
    v = tl.permute(v, [0, 1, 3, 2])
    v = tl.reshape(v, [A * (P >> BITS), 1 << BITS])
    v = _butterflies(v, A * (P >> BITS), 1 << BITS, BITS)
    v = tl.reshape(v, [A, P >> (LOW + BITS), 1 << LOW, 1 << BITS])
    v = tl.permute(v, [0, 1, 3, 2])
    return tl.reshape(v, [A, P])


@triton.jit
def _sylvester_last_axis(y, A: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr, RADIX: tl.constexpr):
    """y @ S_P over the last axis of an [A, P] float32 tile: radix-2 stages of half-width 1, 2, 4, ... (the
    PyTorch backend's order, so power-of-two sizes give bit-identical sums), in groups of RADIX index bits (a
    layout choice only: the additions and their order are the same for every RADIX)."""
    for group in tl.static_range((LOG_P + RADIX - 1) // RADIX):
        y = _sylvester_bits(
            y, A, P, group * RADIX, RADIX if (group + 1) * RADIX <= LOG_P else LOG_P - group * RADIX
        )
    return y


@triton.jit
def _round_half_even(v, INTERPRETER: tl.constexpr):
    """torch.round's rounding (half to even): one instruction on the GPU (libdevice rint = cvt.rni); the CPU
    interpreter has no libdevice, so there it is built from floor (exact for every float32)."""
    if INTERPRETER:
        down = tl.floor(v)
        frac = v - down
        down_is_odd = (down - 2.0 * tl.floor(down * 0.5)) != 0.0
        up = (frac > 0.5) | ((frac == 0.5) & down_is_odd)
        return tl.where(up, down + 1.0, down)
    else:
        return libdevice.rint(v)


@triton.jit
def _round_to_bf16(v):
    """float32 -> nearest bfloat16 value (ties to even), still as float32. Only used by the CPU interpreter, whose
    float32 -> bfloat16 cast truncates; on the GPU the cast itself rounds to nearest even."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _cast(v, DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):
    if INTERPRETER and DTYPE == tl.bfloat16:
        v = _round_to_bf16(v)
    return v.to(DTYPE)


@triton.jit
def _fake_quantize(v, lo, hi, clip_ratio, MAXQ: tl.constexpr, ASYM: tl.constexpr, INTERPRETER: tl.constexpr):
    """Quantize-dequantize v with the range [lo, hi] of its group (broadcastable), as utils.quant.fake_quantize."""
    lo = tl.minimum(lo, 0.0) * clip_ratio
    hi = tl.maximum(hi, 0.0) * clip_ratio
    if ASYM:
        both_zero = (lo == 0.0) & (hi == 0.0)
        lo = tl.where(both_zero, -1.0, lo)
        hi = tl.where(both_zero, 1.0, hi)
        scale = tl.math.div_rn(hi - lo, tl.full(lo.shape, MAXQ, tl.float32))
        zero = _round_half_even(tl.math.div_rn(-lo, scale), INTERPRETER)
        q = tl.clamp(_round_half_even(tl.math.div_rn(v, scale), INTERPRETER) + zero, 0.0, MAXQ)
    else:
        hi = tl.maximum(-lo, hi)
        hi = tl.where(hi == 0.0, 1.0, hi)
        scale = tl.math.div_rn(hi, tl.full(hi.shape, MAXQ, tl.float32))
        zero = tl.zeros_like(scale)
        q = tl.clamp(_round_half_even(tl.math.div_rn(v, scale), INTERPRETER), -MAXQ - 1.0, MAXQ)
    return scale * (q - zero)


@triton.jit(do_not_specialize=["n_rows"])
def _hadamard_kernel(
    x_ptr,
    out_ptr,
    factor_ptr,
    n_rows,
    size1,
    size2,
    stride0,
    stride1,
    stride2,
    stride_n,
    scale,
    clip_ratio,
    M: tl.constexpr,
    M_PAD: tl.constexpr,
    K_CHUNK: tl.constexpr,
    P: tl.constexpr,
    LOG_P: tl.constexpr,
    ROWS: tl.constexpr,
    RADIX: tl.constexpr,
    QUANTIZE: tl.constexpr,
    MAXQ: tl.constexpr,
    ASYM: tl.constexpr,
    GROUP: tl.constexpr,
    ROUND_TO_INPUT: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """out[r] = x[r] @ kron(F, S_P) * scale (F = the +-1 factor at factor_ptr, M_PAD x M_PAD, applied as F^T X),
    optionally followed by the fake quantization of each row (GROUP == 0) or each group of GROUP columns.

    Row r of the input sits at i0 * stride0 + i1 * stride1 + i2 * stride2 with (i0, i1, i2) the digits of r in the
    sizes (-, size1, size2): up to three leading dimensions of any strides, so transposed views need no copy.
    """
    N: tl.constexpr = M * P
    IN_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    OUT_DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    pid = tl.program_id(0)
    cols = tl.arange(0, P)

    if M == 1:
        rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        i2 = rows % size2
        i1 = (rows // size2) % size1
        i0 = rows // (size2 * size1)
        row_offset = i0 * stride0 + i1 * stride1 + i2 * stride2
        mask = row_mask[:, None]
        x = tl.load(x_ptr + row_offset[:, None] + cols[None, :] * stride_n, mask=mask, other=0.0)
        y = _sylvester_last_axis(x.to(tl.float32), ROWS, P, LOG_P, RADIX)
        out_offset = rows[:, None] * N + cols[None, :]
    else:
        # One row per program, viewed as [M_PAD, P]; rows >= M of the view are padding (0, never stored). The factor
        # is applied in chunks of K_CHUNK input blocks, loaded straight from memory, which keeps the dot operands
        # small for large m (172 x 64 for n = 11008).
        row = pid.to(tl.int64)
        i2 = row % size2
        i1 = (row // size2) % size1
        i0 = row // (size2 * size1)
        row_offset = i0 * stride0 + i1 * stride1 + i2 * stride2
        blocks = tl.arange(0, M_PAD)
        mask = (blocks < M)[:, None]
        y = tl.zeros([M_PAD, P], dtype=tl.float32)
        for k0 in range(0, M, K_CHUNK):
            k = k0 + tl.arange(0, K_CHUNK)
            offsets = row_offset + (k[:, None] * P + cols[None, :]) * stride_n
            x = tl.load(x_ptr + offsets, mask=(k < M)[:, None], other=0.0)
            factor = tl.load(factor_ptr + blocks[:, None] * M_PAD + k[None, :])
            if INTERPRETER or IN_DTYPE == tl.float32:
                # The interpreter's dot multiplies bfloat16 bit patterns as integers; float32 is exact here too.
                y += tl.dot(factor.to(tl.float32), x.to(tl.float32), input_precision="ieee")
            else:
                y += tl.dot(factor, x, out_dtype=tl.float32)  # +-1 times 16-bit values: exact products
        y = _sylvester_last_axis(y, M_PAD, P, LOG_P, RADIX)
        out_offset = row * N + blocks[:, None] * P + cols[None, :]
    y = y * scale

    if QUANTIZE:
        if ROUND_TO_INPUT:
            # The unfused composition rounds the transform to x's dtype before quantizing it: do the same.
            y = _cast(y, IN_DTYPE, INTERPRETER).to(tl.float32)
        A: tl.constexpr = ROWS if M == 1 else M_PAD
        if GROUP == 0 and M > 1:
            # One group = the whole row = the whole tile (padding rows are 0 and the range always includes 0).
            flat = tl.reshape(y, [M_PAD * P])
            lo = tl.min(flat, axis=0)
            hi = tl.max(flat, axis=0)
            y = _fake_quantize(y, lo, hi, clip_ratio, MAXQ, ASYM, INTERPRETER)
        else:
            G: tl.constexpr = P if GROUP == 0 else GROUP
            groups = tl.reshape(y, [A, P // G, G])
            lo = tl.min(groups, axis=2, keep_dims=True)
            hi = tl.max(groups, axis=2, keep_dims=True)
            y = tl.reshape(_fake_quantize(groups, lo, hi, clip_ratio, MAXQ, ASYM, INTERPRETER), [A, P])

    tl.store(out_ptr + out_offset, _cast(y, OUT_DTYPE, INTERPRETER), mask=mask)


# Triton decides at decoration time (TRITON_INTERPRET=1 when this module was imported) whether the kernels run
# compiled on the GPU or in its CPU interpreter; the kernel object says which.
_INTERPRETED = not isinstance(_hadamard_kernel, triton.runtime.jit.JITFunction)


def _interpreting() -> bool:
    return _INTERPRETED


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------


def _plan(n: int):
    from .hadamard import _plan as hadamard_plan  # one definition of the layout, the Hadamard module's

    return hadamard_plan(n)


def supports(x: torch.Tensor) -> bool:
    """Whether the kernel handles this tensor: float16/bfloat16/float32 on CUDA (or on the CPU under the
    interpreter), n = m * p with a Hadamard factor m of the Hadamard module, p <= 2^15, and p >= 16 when m > 1."""
    if x.dtype not in _DTYPES or x.dim() == 0:
        return False
    if not (x.is_cuda or (_interpreting() and x.device.type == "cpu")):
        return False
    n = x.shape[-1]
    plan = _plan(n)
    if not plan.is_hadamard or plan.p > MAX_POWER_OF_TWO or n < 2:
        return False
    return plan.m == 1 or plan.p >= _MIN_DOT


def supports_quantize(x: torch.Tensor, spec: QuantSpec) -> bool:
    """The fused kernel additionally needs one group per row, or groups that divide the Sylvester part p."""
    if not supports(x) or not 1 <= spec.bits <= 15:
        return False
    n = x.shape[-1]
    group = spec.groupsize
    if group <= 0 or group == n:
        return True
    p = _plan(n).p
    return p % group == 0


def _next_power_of_two(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


@functools.lru_cache(maxsize=64)
def _padded_factor(m: int, transpose: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The +-1 factor as the kernel's left operand (H_m^T forward, H_m backward), zero-padded to M_PAD x M_PAD."""
    from .hadamard import hadamard_factor

    m_pad = max(_MIN_DOT, _next_power_of_two(m)) if m > 1 else 1
    factor = hadamard_factor(m)
    left = factor if transpose else factor.T
    padded = torch.zeros(m_pad, m_pad, dtype=torch.float64)
    padded[:m, :m] = left
    return padded.to(dtype=dtype, device=device)


class LaunchConfig(NamedTuple):
    """How a launch is laid out; every choice computes the same values (the stage order never changes)."""

    rows: int  # rows per program (1 when m > 1)
    num_warps: int
    radix: int  # index bits per butterfly group, i.e. per data exchange Triton may emit


def launch_config(n: int, n_rows: int, element_size: int) -> LaunchConfig:
    """The default layout for a row length n (what runs when autotuning is off).

    Aim: about 16 elements per thread (two 16-byte vectors of 16-bit data), enough in flight per SM to cover the
    memory latency, and at least ~4 programs per SM (132 SMs on an H100) when there are enough rows, so that small
    n packs several rows per program without starving the GPU. Groups of 5 index bits per exchange.
    """
    plan = _plan(n)
    per_thread = 16 if element_size <= 2 else 8
    if plan.m > 1:
        rows = 1
        elements = max(_MIN_DOT, _next_power_of_two(plan.m)) * plan.p
    else:
        wanted = max(1, 2048 // plan.p)
        enough_programs = max(1, n_rows // 512)
        rows = min(wanted, 1 << (enough_programs.bit_length() - 1))
        elements = rows * plan.p
    num_warps = min(16, max(1, elements // (32 * per_thread)))
    num_warps = 1 << (num_warps.bit_length() - 1)
    return LaunchConfig(rows, num_warps, 5)


def candidate_configs(n: int, n_rows: int, element_size: int) -> list[LaunchConfig]:
    """What the autotuner times: the default, half the warps (twice the elements per thread, so fewer exchanges),
    and single-bit exchanges, capped at 64 elements per thread (register pressure)."""
    plan = _plan(n)
    base = launch_config(n, n_rows, element_size)
    tile = base.rows * (max(_MIN_DOT, _next_power_of_two(plan.m)) if plan.m > 1 else 1) * plan.p
    candidates = []
    for num_warps in (base.num_warps, base.num_warps // 2):
        for radix in (base.radix, 1):
            config = LaunchConfig(base.rows, num_warps, radix)
            if num_warps >= 1 and tile // (32 * num_warps) <= 64 and config not in candidates:
                candidates.append(config)
    return candidates


AUTOTUNE_ENV_VAR = "SPINQUANT_TRITON_AUTOTUNE"
_TUNING_VERSION = 1  # bump when the kernel or the candidates change, so stale tuned layouts are ignored
_TUNED: dict[str, LaunchConfig] = {}
_DISK_LOADED: set[str] = set()


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def tuned_configs() -> dict[str, list[int]]:
    """The configurations the autotuner picked or loaded in this process (for benchmark reports)."""
    return {key: list(config) for key, config in _TUNED.items()}


def _tuning_file() -> Path:
    """Tuned layouts persist next to Triton's compiled kernels, so later processes skip the timing."""
    return Path(triton.knobs.cache.dir) / "spinquant_hadamard_launch_configs.json"


def _load_tuned(device_key: str) -> None:
    if device_key in _DISK_LOADED:
        return
    _DISK_LOADED.add(device_key)
    try:
        saved = json.loads(_tuning_file().read_text())
    except (OSError, ValueError):
        return
    for key, config in saved.items():
        if key.startswith(device_key + "|") and key not in _TUNED:
            try:
                _TUNED[key] = LaunchConfig(*config)
            except TypeError:
                continue  # a file from another version of this module


def _save_tuned() -> None:
    from .io import write_json

    try:
        saved = json.loads(_tuning_file().read_text())
    except (OSError, ValueError):
        saved = {}
    saved.update(tuned_configs())
    try:
        write_json(_tuning_file(), saved)
    except OSError:
        pass  # a read-only cache only costs a re-tuning in the next process


def _choose_config(x: torch.Tensor, out: torch.Tensor, **kernel_options) -> LaunchConfig:
    """On CUDA with autotuning on, time the candidates once per (GPU, n, dtype, kernel variant, row-count bucket)
    on this very call (median, L2 flushed: triton.testing.do_bench) and keep the fastest, in this process and in
    a small JSON file in Triton's cache folder for later ones; else the default. The kernel only writes ``out``,
    so the timing runs are harmless."""
    n = x.shape[-1]
    n_rows = x.numel() // n
    if not (x.is_cuda and autotune_enabled()):
        return launch_config(n, n_rows, x.element_size())
    spec = kernel_options.get("spec")
    variant = f"q{spec.bits}{'a' if spec.asym else 's'}{spec.groupsize}" if spec is not None and spec.enabled else "t"
    if spec is not None and spec.enabled and not kernel_options.get("round_to_input", True):
        variant += "f32"
    bucket = 0 if n_rows < 4096 else 1 if n_rows < 32768 else 2
    device_key = f"{torch.cuda.get_device_name(x.device)}|triton {triton.__version__}|v{_TUNING_VERSION}"
    key = f"{device_key}|{n}|{str(x.dtype).removeprefix('torch.')}|{variant}|rows{bucket}"
    _load_tuned(device_key)
    if key not in _TUNED:
        from triton.testing import do_bench

        timings = []
        for config in candidate_configs(n, n_rows, x.element_size()):
            run = functools.partial(_run, x, out, config=config, **kernel_options)
            timings.append((do_bench(run, warmup=5, rep=20, return_mode="median"), config))
        _TUNED[key] = min(timings)[1]
        _save_tuned()
    return _TUNED[key]


def _row_layout(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int, int]]:
    """Leading dimensions as (size1, size2) and strides (stride0, stride1, stride2), merging the ones that are
    uniformly strided; a tensor needing more than three leading levels is copied contiguous first."""
    dims = [(size, stride) for size, stride in zip(x.shape[:-1], x.stride()[:-1]) if size != 1]
    merged: list[list[int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if len(merged) > 3:
        x = x.contiguous()
        merged = [[x.numel() // max(1, x.shape[-1]), x.shape[-1]]]
    while len(merged) < 3:
        merged.append([1, 0])  # trailing size-1 levels: the kernel's modulo by 1 then folds away (specialised)
    (_, s0), (d1, s1), (d2, s2) = merged
    return x, (d1, d2), (s0, s1, s2)


def kernel_arguments(
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    transpose: bool = False,
    spec: QuantSpec | None = None,
    round_to_input: bool = True,
    config: LaunchConfig | None = None,
) -> tuple[tuple[int], tuple, dict]:
    """(grid, positional arguments, constexpr and launch options) of the kernel for x -> out (also used by the
    benchmark to compile the exact same specialisations ahead of time). x must not need a copy (see _row_layout)."""
    n = x.shape[-1]
    plan = _plan(n)
    n_rows = x.numel() // n
    _, (size1, size2), (stride0, stride1, stride2) = _row_layout(x)
    m_pad = max(_MIN_DOT, _next_power_of_two(plan.m)) if plan.m > 1 else 1
    factor = _padded_factor(plan.m, transpose, x.dtype, x.device) if plan.m > 1 else out  # unused when m == 1
    config = LaunchConfig(*(config or launch_config(n, n_rows, x.element_size())))
    rows = 1 if plan.m > 1 else config.rows
    quantize = spec is not None and spec.enabled
    group = spec.groupsize if quantize and 0 < spec.groupsize < n else 0
    args = (
        x,
        out,
        factor,
        n_rows,
        size1,
        size2,
        stride0,
        stride1,
        stride2,
        x.stride(-1),
        1.0 / math.sqrt(n),
        float(spec.clip_ratio) if quantize else 1.0,
    )
    meta = dict(
        M=plan.m,
        M_PAD=m_pad,
        K_CHUNK=min(m_pad, _MIN_DOT),
        P=plan.p,
        LOG_P=plan.p.bit_length() - 1,
        ROWS=rows,
        RADIX=max(1, config.radix),
        QUANTIZE=quantize,
        MAXQ=spec.maxq if quantize else 0,
        ASYM=bool(spec.asym) if quantize else False,
        GROUP=group,
        ROUND_TO_INPUT=round_to_input,
        INTERPRETER=_interpreting(),
        num_warps=config.num_warps,
        # No multiply-add contraction: e.g. hi * clip - lo * clip must round like PyTorch's two products.
        enable_fp_fusion=False,
    )
    return (triton.cdiv(n_rows, rows),), args, meta


def _run(x: torch.Tensor, out: torch.Tensor, **kernel_options) -> None:
    grid, args, meta = kernel_arguments(x, out, **kernel_options)
    if x.is_cuda:
        with torch.cuda.device(x.device):  # Triton launches on the current device, which need not be x's
            _hadamard_kernel[grid](*args, **meta)
    else:
        _hadamard_kernel[grid](*args, **meta)


def launch(
    x: torch.Tensor,
    *,
    transpose: bool = False,
    spec: QuantSpec | None = None,
    round_to_input: bool = True,
    config: LaunchConfig | tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """One kernel launch without autograd: x @ H (x @ H^T with ``transpose``), fake-quantized with ``spec`` if
    given. ``config`` (rows per program, num_warps, radix) overrides the autotuner / default (benchmark sweep)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x = _row_layout(x)[0]
    options = dict(transpose=transpose, spec=spec, round_to_input=round_to_input)
    config = LaunchConfig(*config) if config is not None else _choose_config(x, out, **options)
    _run(x, out, config=config, **options)
    return out


class _HadamardFunction(torch.autograd.Function):
    """x @ H (transpose=False) or x @ H^T (transpose=True); each is the other's backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        ctx.transpose = transpose
        return launch(x, transpose=transpose)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _HadamardFunction.apply(grad, not ctx.transpose), None


class _HadamardQuantizeFunction(torch.autograd.Function):
    """fake_quantize(x @ H) in one pass; straight-through estimator, so the backward is g @ H^T."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: QuantSpec, round_to_input: bool) -> torch.Tensor:
        return launch(x, spec=spec, round_to_input=round_to_input)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _HadamardFunction.apply(grad, True), None, None


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x @ hadamard_matrix(n) over the last dimension in x's dtype (float32 inside); differentiable."""
    return _HadamardFunction.apply(x, False)


def hadamard_quantize(x: torch.Tensor, spec: QuantSpec, fp32: bool = False) -> torch.Tensor:
    """fake_quantize(hadamard_transform(x), spec) in one pass, returned in x's dtype; differentiable (STE).

    ``fp32=False`` rounds the transform to x's dtype before quantizing (as the unfused composition does);
    ``fp32=True`` quantizes the float32 transform (the paper's ``--fp32_had``) and rounds only the result.
    """
    if not spec.enabled:
        return hadamard_transform(x)
    if not supports_quantize(x, spec):
        raise ValueError(
            f"the fused Hadamard + quantization kernel cannot handle n={x.shape[-1]} with group size "
            f"{spec.groupsize} on a {x.dtype} {x.device.type} tensor; use utils.hadamard.hadamard_quantize"
        )
    return _HadamardQuantizeFunction.apply(x, spec, not fp32)
