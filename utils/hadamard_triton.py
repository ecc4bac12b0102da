"""Triton kernels for the online Hadamard transform, alone and fused with per-token quantization.

Imported lazily by :mod:`utils.hadamard` (its "triton" backend) only when Triton imports and CUDA is available, or
when ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by the tests). Callers use
``utils.hadamard.hadamard_transform`` / ``utils.hadamard.hadamard_quantize``, never this module.

What it computes: exactly ``utils.hadamard``'s definition, ``y = x @ kron(H_m, S_p) / sqrt(n)`` over the last
dimension (``n = m * p``, ``S_p`` the Sylvester matrix in natural order, ``H_m`` a +-1 factor of the Hadamard
module). Viewing one row as an ``m x p`` matrix ``X``: ``y = H_m^T X S_p / sqrt(n)``.

Design (memory bound: each element is read once and written once):

* one program owns whole rows (``ROWS`` rows when ``m == 1``, one row when ``m > 1``), loaded once into registers
  with 16-byte vector loads, computed with float32 sums, stored once;
* tensor-core path (``m == 1``, 16-bit input, ``16 <= p <= DOT_MAX = 512``; see ``_dot_capable``): a tile of
  ``ROWS >= 16`` rows times ``tl.dot`` against the dense +-1 Sylvester matrix (read from a 32 KB table in L2),
  directly on the raw 16-bit input, so every product is exact and only the float32 accumulation rounds. Three
  forms, picked by the config's ``radix`` (log2 of the first dot's size, ``_dot_options``): up to ``p = 128`` one
  dense dot; chunked (DOT = 64 or 128 < p): ``S_p = S_c (x) S_DOT``, each of a row's c <= 4 blocks of DOT columns
  loaded, multiplied by S_DOT and stored on its own, the ``S_c`` part as float32 additions between the blocks
  (no transpose, no reshape, 2 DOT flops per element); two-level (a, b in 16..32): ``X S_b`` on the raw input,
  one transpose of the tile, then ``S_a`` on the float32 intermediate split exactly into three bfloat16 parts
  (2 (b + 3a) flops per element). float32 input keeps the butterflies (exact float32 order, no TF32). Which path
  runs is part of the launch config (``LaunchConfig.dot``): by default the butterflies, which measured faster
  than every tensor-core form at 65536 bf16 rows on an H200 (n = 64..512: 0.93-0.97 of the copy's bandwidth
  against 0.70-0.93); the autotuner's candidates cover both paths wherever the tensor-core path can run;
* the ``m x m`` factor first (``m > 1``): ``tl.dot`` of the +-1 factor (int8 in memory, zero-padded to a power of
  two ``M_PAD``, padding masked off at load) with the raw input tile, in chunks of 16 blocks loaded straight from
  memory, in the input's dtype with float32 accumulation (tensor cores for 16-bit input, FMA for float32), so
  every product is exact; padded blocks are masked to zero and never stored. For small factors (m = 12, 20, 28)
  the order can flip (``LaunchConfig.dot``, the default for m = 12): the butterflies first on the tile as loaded,
  then the factor as a dot on the float32 result split into bfloat16 parts (_split_dot): three for float32 input
  (exact products), two for 16-bit input (16 significant bits, error <= m * 2^-18 of the row's largest output,
  under a quarter of a float16 half-ulp there);
* the Sylvester part elsewhere: log2(p) radix-2 butterfly stages on the register tile, each written as
  reshape -> permute -> split -> add/sub -> join, in the same stage order as the PyTorch backend (bit-identical
  results for powers of two). Triton maps the size-2 axis of stages whose partners sit in one thread to plain
  register adds, those within a warp to shuffles and only the remaining ones to a shared-memory exchange, so the
  kernel does ~log2(p) additions per element and few data exchanges: below the memory time for long rows;
* the fused variant quantizes the transformed tile before the single store (per row, or per group along the last
  dimension), with the formulas of :func:`utils.quant.fake_quantize`: the transform first rounded to the input's
  dtype (as the composition stores it), IEEE division (``div_rn``), round half to even, the same clamp and
  dequantization, scales in float32, and ``scale = span / maxq`` rounded as PyTorch rounds it on the tensor's
  device (a product with the float32 reciprocal on CUDA, a division on the CPU; ``_scale_for``), so it equals
  ``fake_quantize`` of the same transform bit for bit.

Launch layouts (``launch_config``, timed alternatives in ``candidate_configs`` for the run-time autotuner) never
change which additions are done; on the butterfly paths not even their order.

Host side: a call's Python work is a few dict lookups. ``launch`` memoizes per (n, dtype, device, variant, config
or row-count bucket) everything that does not depend on the tensor (the chosen config, the constexprs, the factor
and table operands: ``_Prepared``), and after the first launch of a specialisation calls the compiled kernel
directly, skipping Triton's per-call argument binding and cache-key building (``_launch``); without a gradient to
track, the autograd Function is skipped too. About 30 -> 6 us per ``utils.hadamard.hadamard_transform`` call.

Autograd: the transform is orthogonal, so the backward of ``x -> x @ H`` is ``g -> g @ H^T``: the same kernel with
``H_m`` in place of ``H_m^T`` (``S_p`` is symmetric). The fused quantizer uses the straight-through estimator, so its
backward is the transform's backward as well.
"""

from __future__ import annotations

import contextlib
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
    "AUTOTUNE_WARMUP_MS",
    "AUTOTUNE_REP_MS",
]

MAX_POWER_OF_TWO = 2**15  # largest Sylvester part handled in one program (the row lives in registers)
_MIN_DOT = 16  # tl.dot needs every dimension >= 16
# Row lengths 16..DOT_MAX of 16-bit input (m == 1) run on the tensor cores (_sylvester_dot): one dense dot up to
# S_TABLE, two levels of 16..32 above. Longer rows are memory bound on the butterflies already.
DOT_MAX = 512
S_TABLE = tl.constexpr(128)  # side of the stored Sylvester table the dot operands are read from
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
def _scale_for(span, MAXQ: tl.constexpr, RECIPROCAL: tl.constexpr):
    """span / MAXQ rounded as PyTorch rounds ``tensor / python_int`` on the tensor's device: an IEEE division on
    the CPU, but ``span * (1.0f / MAXQ)`` on CUDA (ATen's div_true_kernel_cuda turns a division by a CPU scalar
    into a product with its float32 reciprocal). The two differ in the last bit for some spans, which moves
    values lying on a rounding boundary (frequent with 16-bit inputs: 0.15% of a 4-bit symmetric quantizer's)."""
    maxq = tl.full(span.shape, MAXQ, tl.float32)
    if RECIPROCAL:
        return span * tl.math.div_rn(tl.full(span.shape, 1.0, tl.float32), maxq)
    else:
        return tl.math.div_rn(span, maxq)


@triton.jit
def _fake_quantize(
    v, lo, hi, clip_ratio, MAXQ: tl.constexpr, ASYM: tl.constexpr, RECIPROCAL: tl.constexpr, INTERPRETER: tl.constexpr
):
    """Quantize-dequantize v with the range [lo, hi] of its group (broadcastable), as utils.quant.fake_quantize."""
    lo = tl.minimum(lo, 0.0) * clip_ratio
    hi = tl.maximum(hi, 0.0) * clip_ratio
    if ASYM:
        both_zero = (lo == 0.0) & (hi == 0.0)
        lo = tl.where(both_zero, -1.0, lo)
        hi = tl.where(both_zero, 1.0, hi)
        scale = _scale_for(hi - lo, MAXQ, RECIPROCAL)
        zero = _round_half_even(tl.math.div_rn(-lo, scale), INTERPRETER)
        q = tl.clamp(_round_half_even(tl.math.div_rn(v, scale), INTERPRETER) + zero, 0.0, MAXQ)
    else:
        hi = tl.maximum(-lo, hi)
        hi = tl.where(hi == 0.0, 1.0, hi)
        scale = _scale_for(hi, MAXQ, RECIPROCAL)
        zero = tl.zeros_like(scale)
        q = tl.clamp(_round_half_even(tl.math.div_rn(v, scale), INTERPRETER), -MAXQ - 1.0, MAXQ)
    return scale * (q - zero)


@triton.jit
def _fake_quantize_groups(y, clip_ratio, R: tl.constexpr, W: tl.constexpr, GROUP: tl.constexpr, MAXQ: tl.constexpr,
                          ASYM: tl.constexpr, RECIPROCAL: tl.constexpr, INTERPRETER: tl.constexpr):
    """Fake-quantize each group of GROUP consecutive columns of an [R, W] tile with the group's own range."""
    groups = tl.reshape(y, [R, W // GROUP, GROUP])
    lo = tl.min(groups, axis=2, keep_dims=True)
    hi = tl.max(groups, axis=2, keep_dims=True)
    quantized = _fake_quantize(groups, lo, hi, clip_ratio, MAXQ, ASYM, RECIPROCAL, INTERPRETER)
    return tl.reshape(quantized, [R, W])


@triton.jit
def _sylvester_block(table_ptr, K: tl.constexpr, DTYPE: tl.constexpr):
    """S_K as a dot operand of dtype DTYPE: the top-left K x K block of the stored S_TABLE (natural order nests:
    S_2k = [[S_k, S_k], [S_k, -S_k]]). A few KB read from L2 per program, amortised over its ROWS rows."""
    i = tl.arange(0, K)
    return tl.load(table_ptr + i[:, None] * S_TABLE + i[None, :]).to(DTYPE)


@triton.jit
def _split_dot(t, s, T_LEFT: tl.constexpr, PARTS: tl.constexpr, INTERPRETER: tl.constexpr):
    """t @ s (T_LEFT) or s @ t for a float32 t and a +-1 (or 0) s on the tensor cores, t split into PARTS bfloat16
    parts multiplied exactly, the smallest first. PARTS = 3: hi + mid + lo == t exactly (3 x 8 significant bits
    cover float32's 24), so only the float32 accumulation rounds, without TF32's loss. PARTS = 2: hi + mid keeps 16
    significant bits (|t - hi - mid| <= 2^-18 |t|), for results rounded to a 16-bit dtype anyway: one dot and one
    operand conversion fewer (n = 1536 on an H200: 0.66 -> 0.82 of the copy's bandwidth). The interpreter
    multiplies in float32 directly."""
    if INTERPRETER:
        if T_LEFT:
            return tl.dot(t, s.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(s.to(tl.float32), t, input_precision="ieee")
    else:
        s = s.to(tl.bfloat16)
        hi = t.to(tl.bfloat16)
        rest = t - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        if T_LEFT:
            if PARTS == 3:
                acc = tl.dot((rest - mid.to(tl.float32)).to(tl.bfloat16), s, out_dtype=tl.float32)
                acc = tl.dot(mid, s, acc, out_dtype=tl.float32)
            else:
                acc = tl.dot(mid, s, out_dtype=tl.float32)
            return tl.dot(hi, s, acc, out_dtype=tl.float32)
        else:
            if PARTS == 3:
                acc = tl.dot(s, (rest - mid.to(tl.float32)).to(tl.bfloat16), out_dtype=tl.float32)
                acc = tl.dot(s, mid, acc, out_dtype=tl.float32)
            else:
                acc = tl.dot(s, mid, out_dtype=tl.float32)
            return tl.dot(s, hi, acc, out_dtype=tl.float32)


@triton.jit
def _sylvester_dot(x, table_ptr, R: tl.constexpr, P: tl.constexpr, DOT: tl.constexpr, INTERPRETER: tl.constexpr):
    """x @ S_P over the last axis of an [R, P] tile of 16-bit input, on the tensor cores; float32 result.

    P == DOT: one dense dot (the products are +-1 times 16-bit values, exact; float32 accumulation).
    P == A * DOT (A, DOT in 16..32): S_P = S_A (x) S_DOT, so each row viewed as an A x DOT matrix X becomes
    S_A X S_DOT: first X S_DOT on the raw input (exact products), then the A axis is brought last (one transpose
    of the tile, through shared memory) and multiplied by S_A with the float32 intermediate split in three
    bfloat16 parts (_split_dot), then transposed back. 2 * (DOT + 3 A) flops per element instead of 2 P."""
    A: tl.constexpr = P // DOT
    if INTERPRETER:
        # The interpreter's dot multiplies 16-bit bit patterns as integers; float32 operands are exact here too.
        t = tl.dot(tl.reshape(x.to(tl.float32), [R * A, DOT]), _sylvester_block(table_ptr, DOT, tl.float32),
                   input_precision="ieee")
    else:
        t = tl.dot(tl.reshape(x, [R * A, DOT]), _sylvester_block(table_ptr, DOT, x.dtype), out_dtype=tl.float32)
    if A == 1:
        return t
    else:
        t = tl.reshape(tl.permute(tl.reshape(t, [R, A, DOT]), [0, 2, 1]), [R * DOT, A])
        u = _split_dot(t, _sylvester_block(table_ptr, A, tl.bfloat16), True, 3, INTERPRETER)
        return tl.reshape(tl.permute(tl.reshape(u, [R, DOT, A]), [0, 2, 1]), [R, P])


@triton.jit
def _chunk_dot(ptrs, mask, s, INTERPRETER: tl.constexpr):
    """One [R, DOT] chunk of the rows times S_DOT (loaded once per program) on the tensor cores: the products are
    +-1 times 16-bit values (exact), the accumulation float32."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if INTERPRETER:
        # The interpreter's dot multiplies 16-bit bit patterns as integers; float32 operands are exact here too.
        return tl.dot(x.to(tl.float32), s, input_precision="ieee")
    else:
        return tl.dot(x, s, out_dtype=tl.float32)


@triton.jit
def _finish_chunk(y, scale, IN_DTYPE: tl.constexpr, QUANTIZE: tl.constexpr, ROUND_TO_INPUT: tl.constexpr,
                  INTERPRETER: tl.constexpr):
    """The scaled transform of a chunk, rounded to the input's dtype first when the fused quantizer follows the
    unfused composition."""
    y = y * scale
    if QUANTIZE and ROUND_TO_INPUT:
        y = _cast(y, IN_DTYPE, INTERPRETER).to(tl.float32)
    return y


@triton.jit
def _store_chunk(ptrs, y, lo, hi, clip_ratio, mask, R: tl.constexpr, DOT: tl.constexpr, QUANTIZE: tl.constexpr,
                 MAXQ: tl.constexpr, ASYM: tl.constexpr, GROUP: tl.constexpr, RECIPROCAL: tl.constexpr,
                 INTERPRETER: tl.constexpr):
    """Fake-quantize a [R, DOT] chunk (per row with the row's [lo, hi], or per group of GROUP <= DOT columns) and
    store it."""
    if QUANTIZE:
        if GROUP == 0:
            y = _fake_quantize(y, lo[:, None], hi[:, None], clip_ratio, MAXQ, ASYM, RECIPROCAL, INTERPRETER)
        else:
            y = _fake_quantize_groups(y, clip_ratio, R, DOT, GROUP, MAXQ, ASYM, RECIPROCAL, INTERPRETER)
    tl.store(ptrs, _cast(y, ptrs.dtype.element_ty, INTERPRETER), mask=mask)


@triton.jit
def _factor_first(x_ptr, factor_ptr, row_offset, stride_n, blocks, cols, M: tl.constexpr, M_PAD: tl.constexpr,
                  K_CHUNK: tl.constexpr, P: tl.constexpr, IN_DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):
    """F^T X of one row viewed as [M_PAD, P] (padding rows 0): the factor applied in chunks of K_CHUNK input blocks,
    loaded straight from memory, which keeps the dot operands small for large m (172 x 64 for n = 11008). Its
    chunks are re-read (from L2) for every row, so they are stored as int8 and their padding is masked off: about
    172 x 172 bytes per row for n = 11008 instead of 256 x 176 x 2."""
    y = tl.zeros([M_PAD, P], dtype=tl.float32)
    for k0 in range(0, M, K_CHUNK):
        k = k0 + tl.arange(0, K_CHUNK)
        offsets = row_offset + (k[:, None] * P + cols[None, :]) * stride_n
        x = tl.load(x_ptr + offsets, mask=(k < M)[:, None], other=0.0)
        factor_mask = (blocks < M)[:, None] & (k < M)[None, :]
        factor = tl.load(factor_ptr + blocks[:, None] * M_PAD + k[None, :], mask=factor_mask, other=0)
        if INTERPRETER or IN_DTYPE == tl.float32:
            # The interpreter's dot multiplies bfloat16 bit patterns as integers; float32 is exact here too.
            y += tl.dot(factor.to(tl.float32), x.to(tl.float32), input_precision="ieee")
        else:
            y += tl.dot(factor.to(IN_DTYPE), x, out_dtype=tl.float32)  # +-1 times 16-bit values: exact
    return y


@triton.jit
def _row_offset(row, size1, size2, stride0, stride1, stride2):
    """Where row r starts: i0 * stride0 + i1 * stride1 + i2 * stride2 with (i0, i1, i2) the digits of r in the sizes
    (-, size1, size2)."""
    i2 = row % size2
    i1 = (row // size2) % size1
    i0 = row // (size2 * size1)
    return i0 * stride0 + i1 * stride1 + i2 * stride2


@triton.jit
def _finish_tile(y, out_ptrs, mask, scale, clip_ratio, IN_DTYPE: tl.constexpr, A: tl.constexpr, P: tl.constexpr,
                 ONE_ROW: tl.constexpr, QUANTIZE: tl.constexpr, MAXQ: tl.constexpr, ASYM: tl.constexpr,
                 GROUP: tl.constexpr, ROUND_TO_INPUT: tl.constexpr, RECIPROCAL: tl.constexpr,
                 INTERPRETER: tl.constexpr):
    """Scale a transformed [A, P] float32 tile, fake-quantize it if asked, store it. Groups: one per tile row, or
    GROUP columns; with ONE_ROW the tile is one row (the m > 1 view, padding rows 0 and masked), one group when
    GROUP == 0."""
    y = y * scale
    if QUANTIZE:
        if ROUND_TO_INPUT:
            # The unfused composition rounds the transform to x's dtype before quantizing it: do the same.
            y = _cast(y, IN_DTYPE, INTERPRETER).to(tl.float32)
        if ONE_ROW and GROUP == 0:
            # One group = the whole row = the whole tile (padding rows are 0 and the range always includes 0).
            flat = tl.reshape(y, [A * P])
            lo = tl.min(flat, axis=0)
            hi = tl.max(flat, axis=0)
            y = _fake_quantize(y, lo, hi, clip_ratio, MAXQ, ASYM, RECIPROCAL, INTERPRETER)
        else:
            y = _fake_quantize_groups(y, clip_ratio, A, P, P if GROUP == 0 else GROUP, MAXQ, ASYM, RECIPROCAL,
                                      INTERPRETER)
    tl.store(out_ptrs, _cast(y, out_ptrs.dtype.element_ty, INTERPRETER), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _hadamard_kernel(
    x_ptr,
    out_ptr,
    factor_ptr,
    table_ptr,
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
    DOT: tl.constexpr,
    CHUNKS: tl.constexpr,
    FACTOR_LAST: tl.constexpr,
    QUANTIZE: tl.constexpr,
    MAXQ: tl.constexpr,
    ASYM: tl.constexpr,
    GROUP: tl.constexpr,
    ROUND_TO_INPUT: tl.constexpr,
    RECIPROCAL: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """out[r] = x[r] @ kron(F, S_P) * scale (F = the +-1 factor at factor_ptr, int8, M_PAD x M_PAD, applied as
    F^T X), optionally followed by the fake quantization of each row (GROUP == 0) or each group of GROUP columns.

    m == 1: ROWS rows per program; S_P by tl.dot against the Sylvester table at table_ptr when DOT > 0
    (_sylvester_dot, or with CHUNKS > 1 the chunked form S_P = S_CHUNKS (x) S_DOT: each row's CHUNKS blocks of
    DOT columns loaded, multiplied by S_DOT and stored separately, the S_CHUNKS part as float32 additions between
    them), else by butterflies. m > 1: one row per program, the factor by tl.dot, S_P by butterflies; the factor
    first on the raw input, or with FACTOR_LAST (M_PAD <= 32) S_P first on the loaded tile and the factor last on
    the float32 result split in bfloat16 parts (_split_dot).

    Row r of the input sits at i0 * stride0 + i1 * stride1 + i2 * stride2 with (i0, i1, i2) the digits of r in the
    sizes (-, size1, size2): up to three leading dimensions of any strides, so transposed views need no copy.
    """
    N: tl.constexpr = M * P
    IN_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    cols = tl.arange(0, P)

    if CHUNKS > 1:
        # Chunked tensor-core path (CHUNKS in 2, 4): no transpose, no reshape, every tile in the dot's layout.
        rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_offset = _row_offset(rows, size1, size2, stride0, stride1, stride2)
        mask = (rows < n_rows)[:, None]
        d = tl.arange(0, DOT)
        s = _sylvester_block(table_ptr, DOT, tl.float32 if INTERPRETER else IN_DTYPE)
        x_ptrs = x_ptr + row_offset[:, None] + d[None, :] * stride_n
        o_ptrs = out_ptr + rows[:, None] * N + d[None, :]
        step = DOT * stride_n
        u0 = _chunk_dot(x_ptrs, mask, s, INTERPRETER)
        u1 = _chunk_dot(x_ptrs + step, mask, s, INTERPRETER)
        if CHUNKS == 2:
            y0 = _finish_chunk(u0 + u1, scale, IN_DTYPE, QUANTIZE, ROUND_TO_INPUT, INTERPRETER)
            y1 = _finish_chunk(u0 - u1, scale, IN_DTYPE, QUANTIZE, ROUND_TO_INPUT, INTERPRETER)
            lo = tl.minimum(tl.min(y0, axis=1), tl.min(y1, axis=1))
            hi = tl.maximum(tl.max(y0, axis=1), tl.max(y1, axis=1))
            _store_chunk(o_ptrs, y0, lo, hi, clip_ratio, mask, ROWS, DOT, QUANTIZE, MAXQ, ASYM, GROUP, RECIPROCAL,
                         INTERPRETER)
            _store_chunk(o_ptrs + DOT, y1, lo, hi, clip_ratio, mask, ROWS, DOT, QUANTIZE, MAXQ, ASYM, GROUP,
                         RECIPROCAL, INTERPRETER)
        else:
            u2 = _chunk_dot(x_ptrs + 2 * step, mask, s, INTERPRETER)
            u3 = _chunk_dot(x_ptrs + 3 * step, mask, s, INTERPRETER)
            a0 = u0 + u1
            a1 = u0 - u1
            a2 = u2 + u3
            a3 = u2 - u3
            y0 = _finish_chunk(a0 + a2, scale, IN_DTYPE, QUANTIZE, ROUND_TO_INPUT, INTERPRETER)
            y1 = _finish_chunk(a1 + a3, scale, IN_DTYPE, QUANTIZE, ROUND_TO_INPUT, INTERPRETER)
            y2 = _finish_chunk(a0 - a2, scale, IN_DTYPE, QUANTIZE, ROUND_TO_INPUT, INTERPRETER)
            y3 = _finish_chunk(a1 - a3, scale, IN_DTYPE, QUANTIZE, ROUND_TO_INPUT, INTERPRETER)
            lo = tl.minimum(tl.minimum(tl.min(y0, axis=1), tl.min(y1, axis=1)),
                            tl.minimum(tl.min(y2, axis=1), tl.min(y3, axis=1)))
            hi = tl.maximum(tl.maximum(tl.max(y0, axis=1), tl.max(y1, axis=1)),
                            tl.maximum(tl.max(y2, axis=1), tl.max(y3, axis=1)))
            _store_chunk(o_ptrs, y0, lo, hi, clip_ratio, mask, ROWS, DOT, QUANTIZE, MAXQ, ASYM, GROUP, RECIPROCAL,
                         INTERPRETER)
            _store_chunk(o_ptrs + DOT, y1, lo, hi, clip_ratio, mask, ROWS, DOT, QUANTIZE, MAXQ, ASYM, GROUP,
                         RECIPROCAL, INTERPRETER)
            _store_chunk(o_ptrs + 2 * DOT, y2, lo, hi, clip_ratio, mask, ROWS, DOT, QUANTIZE, MAXQ, ASYM, GROUP,
                         RECIPROCAL, INTERPRETER)
            _store_chunk(o_ptrs + 3 * DOT, y3, lo, hi, clip_ratio, mask, ROWS, DOT, QUANTIZE, MAXQ, ASYM, GROUP,
                         RECIPROCAL, INTERPRETER)
    elif M == 1:
        # Whole [ROWS, P] tile.
        rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_offset = _row_offset(rows, size1, size2, stride0, stride1, stride2)
        mask = (rows < n_rows)[:, None]
        x = tl.load(x_ptr + row_offset[:, None] + cols[None, :] * stride_n, mask=mask, other=0.0)
        if DOT > 0:
            y = _sylvester_dot(x, table_ptr, ROWS, P, DOT, INTERPRETER)
        else:
            y = _sylvester_last_axis(x.to(tl.float32), ROWS, P, LOG_P, RADIX)
        _finish_tile(y, out_ptr + rows[:, None] * N + cols[None, :], mask, scale, clip_ratio, IN_DTYPE, ROWS, P,
                     False, QUANTIZE, MAXQ, ASYM, GROUP, ROUND_TO_INPUT, RECIPROCAL, INTERPRETER)
    elif FACTOR_LAST:
        # Small factors: the butterflies run on the tile as loaded (the m == 1 layout) and the factor, a few hundred
        # bytes, is one split dot at the end: one layout change instead of one per butterfly group.
        row = pid.to(tl.int64)
        blocks = tl.arange(0, M_PAD)
        mask = (blocks < M)[:, None]
        offsets = _row_offset(row, size1, size2, stride0, stride1, stride2) + (blocks[:, None] * P + cols[None, :]) * stride_n
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        t = _sylvester_last_axis(x.to(tl.float32), M_PAD, P, LOG_P, RADIX)
        factor = tl.load(factor_ptr + blocks[:, None] * M_PAD + blocks[None, :])  # zero-padded
        # Three parts (exact products) for float32 input, two for 16-bit input (_split_dot).
        y = _split_dot(t, factor, False, 3 if IN_DTYPE == tl.float32 else 2, INTERPRETER)
        _finish_tile(y, out_ptr + row * N + blocks[:, None] * P + cols[None, :], mask, scale, clip_ratio, IN_DTYPE,
                     M_PAD, P, True, QUANTIZE, MAXQ, ASYM, GROUP, ROUND_TO_INPUT, RECIPROCAL, INTERPRETER)
    else:
        # One row per program, viewed as [M_PAD, P]; rows >= M of the view are padding (0, never stored).
        row = pid.to(tl.int64)
        row_offset = _row_offset(row, size1, size2, stride0, stride1, stride2)
        blocks = tl.arange(0, M_PAD)
        y = _factor_first(x_ptr, factor_ptr, row_offset, stride_n, blocks, cols, M, M_PAD, K_CHUNK, P, IN_DTYPE,
                          INTERPRETER)
        y = _sylvester_last_axis(y, M_PAD, P, LOG_P, RADIX)
        _finish_tile(y, out_ptr + row * N + blocks[:, None] * P + cols[None, :], (blocks < M)[:, None], scale,
                     clip_ratio, IN_DTYPE, M_PAD, P, True, QUANTIZE, MAXQ, ASYM, GROUP, ROUND_TO_INPUT, RECIPROCAL,
                     INTERPRETER)


# Triton decides at decoration time (TRITON_INTERPRET=1 when this module was imported) whether the kernels run
# compiled on the GPU or in its CPU interpreter; the kernel object says which.
_INTERPRETED = not isinstance(_hadamard_kernel, triton.runtime.jit.JITFunction)


def _interpreting() -> bool:
    return _INTERPRETED


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _plan(n: int):
    from .hadamard import _plan as hadamard_plan  # one definition of the layout, the Hadamard module's

    return hadamard_plan(n)


# supports() / supports_quantize() run on every call (utils.hadamard's dispatch, then again here): memoized on what
# they depend on, so a call costs one dict lookup.
_SUPPORTS: dict[tuple, bool] = {}


def supports(x: torch.Tensor) -> bool:
    """Whether the kernel handles this tensor: float16/bfloat16/float32 on CUDA (or on the CPU under the
    interpreter), n = m * p with a Hadamard factor m of the Hadamard module, p <= 2^15, and p >= 16 when m > 1."""
    if x.dim() == 0:
        return False
    key = (x.shape[-1], x.dtype, x.is_cuda, x.is_cpu)
    ok = _SUPPORTS.get(key)
    if ok is None:
        ok = _SUPPORTS[key] = _supports(*key)
    return ok


def _supports(n: int, dtype: torch.dtype, is_cuda: bool, is_cpu: bool) -> bool:
    if dtype not in _DTYPES or not (is_cuda or (_interpreting() and is_cpu)):
        return False
    plan = _plan(n)
    if not plan.is_hadamard or plan.p > MAX_POWER_OF_TWO or n < 2:
        return False
    return plan.m == 1 or plan.p >= _MIN_DOT


def supports_quantize(x: torch.Tensor, spec: QuantSpec) -> bool:
    """The fused kernel additionally needs one group per row, or groups that divide the Sylvester part p."""
    if x.dim() == 0:
        return False
    key = (x.shape[-1], x.dtype, x.is_cuda, x.is_cpu, spec)
    ok = _SUPPORTS.get(key)
    if ok is None:
        ok = _SUPPORTS[key] = _supports_quantize(key[0], key[1], key[2], key[3], spec)
    return ok


def _supports_quantize(n: int, dtype: torch.dtype, is_cuda: bool, is_cpu: bool, spec: QuantSpec) -> bool:
    if not _supports(n, dtype, is_cuda, is_cpu) or not 1 <= spec.bits <= 15:
        return False
    group = spec.groupsize
    if group <= 0 or group == n:
        return True
    return _plan(n).p % group == 0


def _next_power_of_two(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


@functools.lru_cache(maxsize=64)
def _padded_factor(m: int, transpose: bool, device: torch.device) -> torch.Tensor:
    """The +-1 factor as the kernel's left operand (H_m^T forward, H_m backward), zero-padded to M_PAD x M_PAD, as
    int8: the kernel re-reads it for every row, so the smallest exact type keeps that L2 traffic low."""
    from .hadamard import hadamard_factor

    m_pad = max(_MIN_DOT, _next_power_of_two(m)) if m > 1 else 1
    factor = hadamard_factor(m)
    left = factor if transpose else factor.T
    padded = torch.zeros(m_pad, m_pad, dtype=torch.float64)
    padded[:m, :m] = left
    return padded.to(dtype=torch.int8, device=device)


@functools.lru_cache(maxsize=8)
def _sylvester_table(device: torch.device) -> torch.Tensor:
    """S_TABLE x S_TABLE Sylvester matrix (natural order, +-1, bfloat16: exact, and 32 KB) for the dot path."""
    table = torch.ones(1, 1, dtype=torch.float32)
    while table.shape[0] < S_TABLE.value:
        table = torch.cat((torch.cat((table, table), 1), torch.cat((table, -table), 1)), 0)
    return table.to(dtype=torch.bfloat16, device=device)


def _dot_capable(n: int, dtype: torch.dtype) -> bool:
    """Whether rows of length n in this dtype can take the tensor-core path (_sylvester_dot / the chunked form):
    16-bit input (exact products with +-1; float32 keeps the butterflies, bit-identical to the PyTorch backend and
    free of TF32) and a power of two in 16..DOT_MAX."""
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    plan = _plan(n)
    return plan.m == 1 and _MIN_DOT <= plan.p <= DOT_MAX


def _factor_last_capable(n: int) -> bool:
    """Whether rows of length n = m * p (m > 1) can take the factor-last form (LaunchConfig.dot on those sizes):
    a factor padded to at most 32 (the split dot's operands stay small) and p >= 16 (tl.dot)."""
    plan = _plan(n)
    return plan.m > 1 and _next_power_of_two(plan.m) <= 32 and plan.p >= _MIN_DOT


def _factor_last_default(n: int) -> bool:
    """The default order for n = m * p: the factor last for factors padded to 16 (m = 12): on an H200 (65536 bf16
    rows, L2 flushed) n = 1536 = 12 x 128 went from 0.42 to 0.66 of the copy's bandwidth (0.82 with the two-part
    split of _split_dot); the factor first otherwise (n = 14336 = 28 x 512 measured faster that way). The autotuner times both wherever both can run."""
    return _factor_last_capable(n) and _next_power_of_two(_plan(n).m) <= _MIN_DOT


def _dot_options(p: int, group: int = 0) -> list[int]:
    """log2 of the first dot's size (the config's ``radix`` on the tensor-core path), default first.

    * ``p <= S_TABLE``: one dense dot of size p;
    * chunked (size 64 or 128 < p): the row's p / DOT blocks each times S_DOT, combined by float32 additions
      (S_p = S_{p/DOT} (x) S_DOT; 2 DOT flops per element, no data exchange); a quantization group (``group`` > 0,
      0 = one per row) may not span blocks;
    * two-level (16 or 32, with p / DOT in 16..32): X S_DOT, a transpose of the tile, S_A on the float32
      intermediate split into three bfloat16 parts (_sylvester_dot).

    For 512 the two-level 32 x 16 comes first (0.66 of the copy's bandwidth on an H200); for 256 the chunked form
    (the two-level one reached only 0.15 there)."""
    if p <= S_TABLE.value:
        return [p.bit_length() - 1]
    chunked = [bits for bits in (7, 6) if p >> bits <= 4 and (group == 0 or group <= 1 << bits)]
    two_level = [bits for bits in (5, 4) if _MIN_DOT <= p >> bits <= 32]
    return two_level + chunked if p == 512 else chunked + two_level


_BUTTERFLY_PER_THREAD = 64  # elements per thread of the default butterfly layout (launch_config)


class LaunchConfig(NamedTuple):
    """How a launch is laid out. On the butterfly paths every choice computes the same values (the stage order
    never changes); on the tensor-core path (16-bit rows of 16..DOT_MAX) ``radix`` picks the dot size / split,
    which only changes the float32 summation order. ``dot`` picks the path (None: the default for the size); for
    n = m * p with m > 1 it picks the order instead: the factor last (True, where _factor_last_capable) or first."""

    rows: int  # rows per program (1 when m > 1)
    num_warps: int
    radix: int  # index bits per step: per butterfly data exchange, or per dense dot (log2 of its size)
    dot: bool | None = None  # tensor-core path (True), butterflies (False), or the size's default (None)


def launch_config(n: int, n_rows: int, dtype: torch.dtype, dot: bool | None = None) -> LaunchConfig:
    """The default layout for a row length n (what runs when autotuning is off): the butterflies, or where ``dot``
    asks for it the tensor-core path (m == 1, where _dot_capable) or the factor-last order (m > 1).

    Butterflies: 64 elements per thread (fewer threads per row, so more of the butterfly stages stay inside a
    thread or a warp), and at least ~4 programs per SM (132 SMs on an H100) when there are enough rows, so that
    small n packs several rows per program without starving the GPU. Groups of 7 index bits per data exchange, or
    single-bit groups when the tile fits one warp. On an H200 (65536 bf16 rows) this took n = 4096 / 8192 / 16384
    from 0.73 / 0.63 / 0.54 of the copy's bandwidth (16 elements per thread, 5-bit groups) to 0.98 / 0.96 / 0.79,
    and n = 128..2048 to 0.93-0.99 (``benchmarks/bench_hadamard.py --sweep``).

    Tensor-core path: 16K elements per program up to 128 columns (a [128, 128] tile: 32 KB in, 32 KB out, the
    32 KB S_128 read once from L2 per 128 rows, as cuBLAS's x @ H does), 8K above (the float32 intermediates
    live at once), at least 16 rows (tl.dot) and again ~4 programs per SM; 4 or 8 warps (one or two warpgroups of
    Hopper's wgmma).
    """
    plan = _plan(n)
    if dot and _dot_capable(n, dtype):
        tile = 16384 if plan.p <= S_TABLE.value else 8192
        wanted = max(_MIN_DOT, tile // plan.p)
        enough_programs = max(1, n_rows // 528)
        rows = max(_MIN_DOT, min(wanted, 1 << (enough_programs.bit_length() - 1)))
        num_warps = 8 if rows * plan.p >= 8192 else 4
        return LaunchConfig(rows, num_warps, _dot_options(plan.p)[0], True)
    factor_last = False
    if plan.m > 1:
        rows = 1
        elements = max(_MIN_DOT, _next_power_of_two(plan.m)) * plan.p
        factor_last = _factor_last_capable(n) and (_factor_last_default(n) if dot is None else dot)
    else:
        wanted = max(1, 2048 // plan.p)
        enough_programs = max(1, n_rows // 512)
        rows = min(wanted, 1 << (enough_programs.bit_length() - 1))
        elements = rows * plan.p
    num_warps = min(16, max(1, elements // (32 * _BUTTERFLY_PER_THREAD)))
    num_warps = 1 << (num_warps.bit_length() - 1)
    radix = min(7 if num_warps > 1 or plan.m > 1 else 1, max(1, plan.p.bit_length() - 1))
    return LaunchConfig(rows, num_warps, radix, factor_last)


def candidate_configs(n: int, n_rows: int, dtype: torch.dtype, group: int = 0) -> list[LaunchConfig]:
    """What the autotuner times, default first (``group``: the fused quantizer's group size, 0 for one per row).

    Butterflies: the default and twice its warps (32 elements per thread), each with groups of 7, 3 and 1 index
    bits and all log2(p) bits at once (which of them wins varies with n on an H200). Tensor-core path: the default,
    half and twice
    the rows per program (at least 16), the other warp count, and the other dot sizes / splits. Rows the
    tensor-core path can run get both paths' candidates, the size's default path first."""
    plan = _plan(n)
    base = launch_config(n, n_rows, dtype)
    butterflies = []
    bfly = launch_config(n, n_rows, dtype, dot=False)
    log_p = plan.p.bit_length() - 1
    for num_warps in (bfly.num_warps, min(32, 2 * bfly.num_warps)):
        for radix in (bfly.radix, 7, 3, 1, log_p):
            # Groups of log2(p) bits or more are all the same layout: one group.
            config = LaunchConfig(bfly.rows, num_warps, min(radix, max(1, log_p)), False)
            if config not in butterflies:
                butterflies.append(config)
    if _factor_last_capable(n):
        # The same layouts with the factor last, the size's default order first. (1, 2 or 4 rows per program in that
        # form, all loaded before the first is computed, were timed on an H200: none beat one row per program.)
        both = butterflies + [config._replace(dot=True) for config in butterflies]
        return sorted(both, key=lambda config: config.dot != base.dot)
    if not _dot_capable(n, dtype):
        return butterflies
    dots = []
    options = _dot_options(plan.p, group)
    first = launch_config(n, n_rows, dtype, dot=True)
    first = first._replace(radix=options[0]) if first.radix not in options else first
    choices = [first]
    choices += [first._replace(rows=rows) for rows in (first.rows // 2, first.rows * 2) if rows >= _MIN_DOT]
    choices.append(first._replace(num_warps=12 - first.num_warps))  # 4 <-> 8
    choices += [first._replace(radix=bits) for bits in options[1:]]
    for config in choices:
        if config.rows * plan.p // (32 * config.num_warps) <= 128 and config not in dots:
            dots.append(config)
    return dots + butterflies if base.dot else butterflies + dots


AUTOTUNE_ENV_VAR = "SPINQUANT_TRITON_AUTOTUNE"
AUTOTUNE_WARMUP_MS, AUTOTUNE_REP_MS = 5, 20  # do_bench's warm-up and measuring time per candidate
_TUNING_VERSION = 5  # bump when the kernel or the candidates change, so stale tuned layouts are ignored
_TUNED: dict[str, LaunchConfig] = {}
_DISK_LOADED: set[str] = set()


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def tuned_configs() -> dict[str, list]:
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


@functools.lru_cache(maxsize=None)
def _device_key(device_index: int) -> str:
    return f"{torch.cuda.get_device_name(device_index)}|triton {triton.__version__}|v{_TUNING_VERSION}"


def _choose_config(
    x: torch.Tensor, out: torch.Tensor, n_rows: int | None = None, **kernel_options
) -> tuple[LaunchConfig, str | None]:
    """(config, key in _TUNED or None). On CUDA with autotuning on, time the candidates once per (GPU, n, dtype,
    kernel variant, row-count bucket) on this very call (median, L2 flushed: triton.testing.do_bench) and keep the
    fastest, in this process and in a small JSON file in Triton's cache folder for later ones; else the default
    for ``n_rows`` rows (x's row count if None). The kernel only writes ``out``, so the timing runs are harmless.
    Called once per (n, dtype, device, variant, row-count bucket): launch() memoizes what it returns."""
    n = x.shape[-1]
    n_rows = x.numel() // n if n_rows is None else n_rows
    if not (x.is_cuda and autotune_enabled()):
        return launch_config(n, n_rows, x.dtype), None
    spec = kernel_options.get("spec")
    quantize = spec is not None and spec.enabled
    variant = f"q{spec.bits}{'a' if spec.asym else 's'}{spec.groupsize}" if quantize else "t"
    if quantize and not kernel_options.get("round_to_input", True):
        variant += "f32"
    # Row counts within a factor of 4 share a tuned layout: the best rows per program and warps change with the
    # number of programs per SM.
    bucket = n_rows.bit_length() // 2
    device_key = _device_key(x.get_device())
    key = f"{device_key}|{n}|{str(x.dtype).removeprefix('torch.')}|{variant}|rows{bucket}"
    _load_tuned(device_key)
    if key not in _TUNED:
        from triton.testing import do_bench

        group = spec.groupsize if quantize and 0 < spec.groupsize < n else 0
        timings = []
        for config in candidate_configs(n, n_rows, x.dtype, group):
            run = functools.partial(_run, x, out, config=config, **kernel_options)
            timings.append((do_bench(run, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS, return_mode="median"),
                            config))
        _TUNED[key] = min(timings, key=lambda timing: timing[0])[1]
        _save_tuned()
    return _TUNED[key], key


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


def _layout(x: torch.Tensor, n: int) -> tuple:
    """(x, size1, size2, stride0, stride1, stride2, stride_n) for the kernel; contiguous rows without any work."""
    if x.is_contiguous():
        return x, 1, 1, n, 0, 0, 1
    x, (size1, size2), (stride0, stride1, stride2) = _row_layout(x)
    return x, size1, size2, stride0, stride1, stride2, x.stride(-1)


class _Prepared:
    """Everything a launch needs that does not depend on the tensor's address, shape or strides: the launch config,
    the kernel's constexprs and options, the constant operands, and the compiled kernels by specialisation."""

    __slots__ = ("config", "rows", "meta", "constexprs", "factor", "table", "scale", "clip", "tuned_key", "kernels")

    def __init__(self, x: torch.Tensor, out: torch.Tensor, n: int, transpose: bool, spec: QuantSpec | None,
                 round_to_input: bool, reciprocal: bool, config: LaunchConfig, tuned_key: str | None):
        plan = _plan(n)
        p = plan.p
        quantize = spec is not None
        group = spec.groupsize if quantize and 0 < spec.groupsize < n else 0
        m_pad = max(_MIN_DOT, _next_power_of_two(plan.m)) if plan.m > 1 else 1
        rows = 1 if plan.m > 1 else config.rows
        factor_last = False
        if plan.m > 1:
            factor_last = _factor_last_default(n) if config.dot is None else bool(config.dot)
            if factor_last and not _factor_last_capable(n):
                raise ValueError(f"factor-last launch config {tuple(config)} for n={n}: needs m <= 32 and p >= 16")
        use_dot = plan.m == 1 and bool(config.dot)
        dot = chunks = 0
        if use_dot:
            options = _dot_options(p, group) if _dot_capable(n, x.dtype) else []
            if not (rows >= _MIN_DOT and config.radix in options):
                valid = f"16-bit rows of {_MIN_DOT}..{DOT_MAX}, rows >= {_MIN_DOT}, radix in {options}"
                raise ValueError(f"dot-path launch config {tuple(config)} for n={n}: needs {valid}")
            dot = 1 << config.radix
            chunks = p // dot if dot >= 64 and p > dot else 1
        self.config = config
        self.rows = rows
        self.tuned_key = tuned_key
        self.factor = _padded_factor(plan.m, transpose, x.device) if plan.m > 1 else out  # unused when m == 1
        self.table = _sylvester_table(x.device) if dot else out  # unused on the butterfly paths
        self.scale = 1.0 / math.sqrt(n)
        self.clip = float(spec.clip_ratio) if quantize else 1.0
        self.meta = dict(
            M=plan.m,
            M_PAD=m_pad,
            K_CHUNK=min(m_pad, _MIN_DOT),
            P=p,
            LOG_P=p.bit_length() - 1,
            ROWS=rows,
            RADIX=max(1, config.radix),
            DOT=dot,
            CHUNKS=chunks,
            FACTOR_LAST=factor_last,
            QUANTIZE=quantize,
            MAXQ=spec.maxq if quantize else 0,
            ASYM=bool(spec.asym) if quantize else False,
            GROUP=group,
            ROUND_TO_INPUT=round_to_input,
            RECIPROCAL=quantize and reciprocal,
            INTERPRETER=_interpreting(),
            num_warps=config.num_warps,
            # No multiply-add contraction: e.g. hi * clip - lo * clip must round like PyTorch's two products.
            enable_fp_fusion=False,
        )
        names = _hadamard_kernel.arg_names if hasattr(_hadamard_kernel, "arg_names") else ()
        self.constexprs = tuple(self.meta[name] for name in names[_N_ARGS:])  # the launcher's trailing arguments
        self.kernels = {} if not _INTERPRETED and len(self.constexprs) == len(names) - _N_ARGS else None

    def arguments(self, x: torch.Tensor, out: torch.Tensor, n_rows: int, layout: tuple) -> tuple:
        _, size1, size2, stride0, stride1, stride2, stride_n = layout
        return (x, out, self.factor, self.table, n_rows, size1, size2, stride0, stride1, stride2, stride_n,
                self.scale, self.clip)


_N_ARGS = 13  # the kernel's run-time arguments, before its constexprs
_PREPARED: dict[tuple, _Prepared] = {}
_MAX_SPECIALISATIONS = 64  # compiled kernels remembered per _Prepared (one per alignment / stride pattern)
# (current device, current stream) getters of Triton's driver, set after the first compiled launch; None under the
# interpreter or before any launch.
_DIRECT: tuple | None = None


def _prepared(x: torch.Tensor, out: torch.Tensor, n: int, n_rows: int, transpose: bool, spec: QuantSpec | None,
              round_to_input: bool, config: LaunchConfig | None) -> _Prepared:
    """The memoized _Prepared for this call: keyed on (n, dtype, device, transpose, quantizer, rounding, division
    rule, config or [row-count bucket and autotuning]). With the autotuner, an entry is only reused while its
    config is still the tuned one (tests clear _TUNED)."""
    cuda = x.is_cuda
    tune = config is None and cuda and autotune_enabled()
    reciprocal = spec is not None and _torch_divides_by_reciprocal(x.device)
    # Default layouts depend on the row count through its power of two only (see _representative_rows).
    bucket = n_rows.bit_length() if config is None else 0
    key = (n, x.dtype, x.get_device(), x.is_cpu, transpose, spec, round_to_input, reciprocal, config, bucket, tune)
    entry = _PREPARED.get(key)
    if entry is not None and (entry.tuned_key is None or _TUNED.get(entry.tuned_key) == entry.config):
        return entry
    tuned_key = None
    if config is None:
        options = dict(transpose=transpose, spec=spec, round_to_input=round_to_input)
        config, tuned_key = _choose_config(x, out, _representative_rows(n_rows), **options)
    entry = _Prepared(x, out, n, transpose, spec, round_to_input, reciprocal, LaunchConfig(*config), tuned_key)
    _PREPARED[key] = entry
    return entry


def _representative_rows(n_rows: int) -> int:
    """The largest power of two <= n_rows: the default layouts are chosen per power-of-two bucket of rows (so one
    memoized entry serves the bucket; exact for power-of-two row counts)."""
    return 1 << (n_rows.bit_length() - 1)


def _launch(entry: _Prepared, x: torch.Tensor, out: torch.Tensor, n_rows: int, layout: tuple) -> None:
    """Launch the kernel. After the first launch of a specialisation on a device, the compiled kernel is called
    directly (what Triton's JITFunction.run does after its cache lookup, without binding 29 arguments, building the
    cache key or the options string each call). The specialisation key is exactly what Triton specialises on:
    x's 16-byte alignment (out, the factor and the table are allocations, always aligned), n_rows' integer width,
    and the size / stride values (Triton specialises on == 1 and % 16). Launch hooks (profilers) take Triton's
    path."""
    args = entry.arguments(x, out, n_rows, layout)
    grid = (n_rows + entry.rows - 1) // entry.rows
    kernels = entry.kernels
    if kernels is None:  # the interpreter
        _hadamard_kernel[(grid,)](*args, **entry.meta)
        return
    device = x.get_device()
    direct = _DIRECT
    if direct is None or device != direct[0]() or _hooks_active():
        with torch.cuda.device(device) if x.is_cuda else contextlib.nullcontext():
            _hadamard_kernel[(grid,)](*args, **entry.meta)  # Triton launches on the current device
        _remember_driver()
        return
    key = (x.data_ptr() & 15 == 0, n_rows > 0x7FFFFFFF, *layout[1:])
    kernel = kernels.get(key)
    if kernel is None:
        compiled = _hadamard_kernel[(grid,)](*args, **entry.meta)
        if hasattr(compiled, "result"):
            compiled = compiled.result()
        if len(kernels) < _MAX_SPECIALISATIONS:
            kernels[key] = (compiled.run, compiled.function, compiled.packed_metadata)
        return
    run, function, packed_metadata = kernel
    run(grid, 1, 1, direct[1](device), function, packed_metadata, None, None, None, *args, *entry.constexprs)


def _hooks_active() -> bool:
    """Whether launch hooks (e.g. a profiler's) are installed: those launches go through Triton's own path."""
    runtime = triton.knobs.runtime
    enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter)) or bool(getattr(exit_, "calls", exit_))


def _remember_driver() -> None:
    global _DIRECT
    if _DIRECT is None and not _INTERPRETED:
        from triton.runtime.driver import driver

        _DIRECT = (driver.active.get_current_device, driver.active.get_current_stream)


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
    benchmark to compile the exact same specialisations ahead of time). x must not need a copy (see _row_layout).
    Without ``config``, the default layout for x's row count."""
    n = x.shape[-1]
    n_rows = x.numel() // n
    spec = spec if spec is not None and spec.enabled else None
    config = LaunchConfig(*(config or launch_config(n, n_rows, x.dtype)))
    reciprocal = spec is not None and _torch_divides_by_reciprocal(x.device)
    entry = _Prepared(x, out, n, transpose, spec, round_to_input, reciprocal, config, None)
    layout = _layout(x, n)
    return (triton.cdiv(n_rows, entry.rows),), entry.arguments(x, out, n_rows, layout), dict(entry.meta)


def _torch_divides_by_reciprocal(device: torch.device) -> bool:
    """Whether PyTorch computes ``float32_tensor / python_int`` on this device as a product with the float32
    reciprocal (CUDA: ATen's div_true_kernel_cuda does so for every CPU-scalar divisor) rather than as an IEEE
    division (CPU). fake_quantize's ``scale = span / maxq`` is such a division, so the fused kernel follows the
    device's rule to give the composition's values bit for bit. A function so tests can emulate the CUDA rule."""
    return device.type == "cuda"


def _run(x: torch.Tensor, out: torch.Tensor, *, transpose: bool = False, spec: QuantSpec | None = None,
         round_to_input: bool = True, config: LaunchConfig | None = None) -> None:
    """One launch for x -> out (x must not need a copy) with the given or the default layout."""
    n = x.shape[-1]
    n_rows = x.numel() // n
    spec = spec if spec is not None and spec.enabled else None
    config = LaunchConfig(*config) if config is not None else None
    entry = _prepared(x, out, n, n_rows, transpose, spec, round_to_input, config)
    _launch(entry, x, out, n_rows, _layout(x, n))


def launch(
    x: torch.Tensor,
    *,
    transpose: bool = False,
    spec: QuantSpec | None = None,
    round_to_input: bool = True,
    config: LaunchConfig | tuple | None = None,
) -> torch.Tensor:
    """One kernel launch without autograd: x @ H (x @ H^T with ``transpose``), fake-quantized with ``spec`` if
    given. ``config`` (rows per program, num_warps, radix[, dot]) overrides the autotuner / default (benchmark
    sweep). The host work per call is a few dict lookups once the (n, dtype, variant, rows bucket) was seen."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows = out.numel()
    if n_rows == 0:
        return out
    n = x.shape[-1]
    n_rows //= n
    if spec is not None and not spec.enabled:
        spec = None
    if config is not None:
        config = LaunchConfig(*config)
    layout = _layout(x, n)
    x = layout[0]
    entry = _prepared(x, out, n, n_rows, transpose, spec, round_to_input, config)
    _launch(entry, x, out, n_rows, layout)
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
    """x @ hadamard_matrix(n) over the last dimension in x's dtype (float32 inside); differentiable. Without a
    gradient to track, the kernel is launched directly (autograd.Function.apply costs microseconds per call)."""
    if x.requires_grad and torch.is_grad_enabled():
        return _HadamardFunction.apply(x, False)
    return launch(x)


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
    if x.requires_grad and torch.is_grad_enabled():
        return _HadamardQuantizeFunction.apply(x, spec, not fp32)
    return launch(x, spec=spec, round_to_input=not fp32)
