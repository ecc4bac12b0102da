"""Tests for utils/hadamard.py: exact factor constructions, orthogonality, transform == matmul, autograd, backends."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from utils import hadamard
from utils.hadamard import (
    SUPPORTED_FACTORS,
    available_backends,
    decompose_size,
    hadamard_factor,
    hadamard_matrix,
    hadamard_transform,
    register_backend,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
UNSUPPORTED_SIZES = (3, 7, 136, 168, 200)  # odd parts 3, 7, 17, 21, 25 (88 = 44 * 2 IS supported)
SMALL_SUPPORTED_SIZES = sorted({m * 2**k for m in SUPPORTED_FACTORS for k in range(7) if m * 2**k <= 1536})


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The tensors here are small; one intra-op thread avoids OpenMP oversubscription (a 50x slowdown was seen on
    the shared 2-core machine under load). Restored afterwards for other test modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _sizes_up_to(limit: int) -> list[int]:
    return sorted({m * 2**k for m in SUPPORTED_FACTORS for k in range(7) if m * 2**k <= limit})


def _eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)


def _sylvester_column(p: int, d: int) -> torch.Tensor:
    """Column d of the unnormalised Sylvester matrix: S[b, d] = (-1)^popcount(b & d), built without S itself."""
    signs = [1 - 2 * (bin(b & d).count("1") % 2) for b in range(p)]
    return torch.tensor(signs, dtype=torch.float64)


def _reference_columns(x: torch.Tensor, n: int, columns: list[int]) -> torch.Tensor:
    """(x @ H)[:, j] from H[a*p + b, c*p + d] = H_m[a, c] S_p[b, d] / sqrt(n), independent of the fast path."""
    m, p = decompose_size(n)
    factor = hadamard_factor(m)
    x3 = x.to(torch.float64).reshape(-1, m, p)
    out = []
    for j in columns:
        c, d = divmod(j, p)
        weight = torch.outer(factor[:, c], _sylvester_column(p, d)) / math.sqrt(n)
        out.append((x3 * weight).sum(dim=(1, 2)))
    return torch.stack(out, dim=1)


# ------------------------------------------------------------------------------------------------ factors


@pytest.mark.parametrize("m", sorted(set(SUPPORTED_FACTORS) | {2}))
def test_factor_is_exact_hadamard(m):
    # Integer arithmetic: exact equality, no tolerance.
    h = hadamard_factor(m)
    assert h.shape == (m, m)
    hi = h.to(torch.int64)
    assert torch.equal(hi.to(torch.float64), h), "entries must be integers"
    assert bool((hi.abs() == 1).all())
    assert torch.equal(hi @ hi.T, m * torch.eye(m, dtype=torch.int64))


def test_factor_is_a_fresh_copy():
    h = hadamard_factor(12)
    h.zero_()
    assert bool((hadamard_factor(12).abs() == 1).all())


def test_unknown_factor_raises():
    with pytest.raises(ValueError, match="no Hadamard factor of order 24"):
        hadamard_factor(24)


def test_all_factors_build_well_under_a_second():
    hadamard._built_factor.cache_clear()
    hadamard._galois_field.cache_clear()
    start = time.process_time()  # CPU time, so other processes on the machine do not make this flaky
    for m in SUPPORTED_FACTORS:
        hadamard_factor(m)
    assert time.process_time() - start < 1.0


@pytest.mark.parametrize("q", [5, 9, 13, 17, 25, 29, 37])
def test_turyn_williamson_family_is_general(q):
    # The order-156 factor relies on Turyn's family; check the Williamson conditions for several q (exact ints).
    a, b, c, d = hadamard._turyn_williamson_quadruple(q)
    n = (q + 1) // 2
    for w in (a, b, c, d):
        assert torch.equal(w, w.T) and bool((w.abs() == 1).all())
    assert torch.equal(a @ a + b @ b + c @ c + d @ d, 4 * n * torch.eye(n, dtype=torch.int64))


@pytest.mark.parametrize("q, order", [(27, 28), (9, 20), (23, 24), (49, 100)])
def test_paley_constructions_over_other_fields(q, order):
    # GF(27), GF(9), GF(49) exercise the extension-field code beyond the fields the factors need (exact ints).
    h = hadamard._paley_type_1(q) if q % 4 == 3 else hadamard._paley_type_2(q)
    assert torch.equal(h @ h.T, order * torch.eye(order, dtype=torch.int64))


# ------------------------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize(
    "n, expected",
    [
        (1, (1, 1)),
        (2, (1, 2)),
        (4096, (1, 4096)),
        (12, (12, 1)),
        (24, (12, 2)),
        (40, (20, 2)),
        (80, (20, 4)),
        (156 * 2, (156, 2)),
        (11008, (172, 64)),
        (14336, (28, 512)),
        (0, None),
        (-4, None),
        *[(n, None) for n in UNSUPPORTED_SIZES],
    ],
)
def test_decompose_size(n, expected):
    assert decompose_size(n) == expected


def test_decompose_size_covers_every_supported_product():
    for m in SUPPORTED_FACTORS:
        for k in range(8):
            split = decompose_size(m * 2**k)
            assert split is not None and split[0] * split[1] == m * 2**k and split[0] <= m
            assert split[0] in SUPPORTED_FACTORS and split[1] & (split[1] - 1) == 0


# ------------------------------------------------------------------------------------------------ hadamard_matrix


@pytest.mark.parametrize("n", SMALL_SUPPORTED_SIZES)
def test_hadamard_matrix_orthogonal(n):
    # float64 products of n terms of size 1/n: rounding ~ n * 1e-16 <= 1e-13, so 1e-12 is tight but safe.
    h = hadamard_matrix(n, dtype=torch.float64)
    torch.testing.assert_close(h.T @ h, _eye(n), rtol=0, atol=1e-12)
    # Entries of a normalised Hadamard matrix all have magnitude 1/sqrt(n) (same 1e-12 float64 margin).
    torch.testing.assert_close(h.abs(), torch.full_like(h, n**-0.5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [n for n in _sizes_up_to(12000) if n > 1536])
def test_large_sizes_rows_orthonormal(n):
    # Dense n x n products above ~1.5k are too slow here; rows of H (= transform of unit vectors) sampled instead.
    # Tolerance 1e-12: float64 butterflies plus one small matmul, error ~ log2(n) * 1e-16.
    idx = torch.arange(0, n, max(1, n // 24))
    unit_rows = torch.zeros(len(idx), n, dtype=torch.float64)
    unit_rows[torch.arange(len(idx)), idx] = 1.0
    rows = hadamard_transform(unit_rows, backend="torch")
    torch.testing.assert_close(rows @ rows.T, _eye(len(idx)), rtol=0, atol=1e-12)
    torch.testing.assert_close(rows.abs(), torch.full_like(rows, n**-0.5), rtol=0, atol=1e-12)


def test_hadamard_matrix_dtype_device_and_fresh_copy():
    h = hadamard_matrix(24)
    assert h.dtype == torch.float32 and h.device.type == "cpu"
    assert hadamard_matrix(24, torch.bfloat16).dtype == torch.bfloat16
    h64 = hadamard_matrix(24, torch.float64)
    h64.zero_()
    assert bool((hadamard_matrix(24, torch.float64) != 0).all())
    with pytest.raises(ValueError):
        hadamard_matrix(0)


@pytest.mark.parametrize("n", sorted({m * 2**k for m in SUPPORTED_FACTORS for k in (0, 1)} | {2, 4, 64, 12 * 128}))
def test_matrix_equals_transform_of_identity(n):
    # Same float64 arithmetic on both sides up to summation order: 1e-12.
    for backend in ("torch", "dense"):
        torch.testing.assert_close(
            hadamard_transform(_eye(n), backend=backend), hadamard_matrix(n, torch.float64), rtol=0, atol=1e-12
        )


@pytest.mark.parametrize("n", UNSUPPORTED_SIZES)
def test_unsupported_sizes_warn_and_are_orthogonal_and_deterministic(n):
    assert decompose_size(n) is None
    with pytest.warns(UserWarning, match=f"n={n}"):
        h = hadamard_matrix(n, dtype=torch.float64)
    with pytest.warns(UserWarning, match=f"n={n}"):
        again = hadamard_matrix(n, dtype=torch.float64)
    assert torch.equal(h, again)
    # float64 QR + Kronecker: orthogonal to ~1e-15; 1e-12 leaves margin.
    torch.testing.assert_close(h.T @ h, _eye(n), rtol=0, atol=1e-12)
    with pytest.warns(UserWarning, match=f"n={n}"):
        transformed = hadamard_transform(_eye(n))
    torch.testing.assert_close(transformed, h, rtol=0, atol=1e-12)


def test_fallback_factor_ignores_the_global_rng():
    torch.manual_seed(0)
    first = hadamard._seeded_orthogonal(200, 25)
    with pytest.warns(UserWarning):
        before = hadamard_matrix(200, torch.float64)
    torch.manual_seed(12345)
    torch.randn(100)
    hadamard._plan.cache_clear()
    hadamard._dense_float64.cache_clear()
    assert torch.equal(hadamard._seeded_orthogonal(200, 25), first)
    with pytest.warns(UserWarning):
        assert torch.equal(hadamard_matrix(200, torch.float64), before)


def test_fallback_matrix_is_identical_in_a_fresh_process():
    code = (
        "import hashlib, warnings, torch\n"
        "warnings.simplefilter('ignore')\n"
        "from utils.hadamard import hadamard_matrix\n"
        "print(hashlib.sha256(hadamard_matrix(200, torch.float64).numpy().tobytes()).hexdigest())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    with pytest.warns(UserWarning):
        here = hashlib.sha256(hadamard_matrix(200, torch.float64).numpy().tobytes()).hexdigest()
    assert result.stdout.strip() == here


# ------------------------------------------------------------------------------------------------ transform values

TRANSFORM_SIZES = [1, 2, 12, 64, 576, 1536, 40 * 8, 156 * 4, 172 * 2]
# Tolerances (rtol, atol) against a float64 reference computed from the same (already rounded) input:
#  float64: only summation-order rounding, ~1e-15.
#  float32: log2(n) butterfly stages + one matmul in float32, error ~ 12 * 6e-8 ~ 1e-6; outputs are O(1).
#  bfloat16 / float16: computed in float32, so the error is the final rounding to 8 / 11 mantissa bits
#  (relative 2^-8 ~ 4e-3 / 2^-11 ~ 5e-4), plus an absolute margin for outputs near zero.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (8e-3, 1e-2),
    torch.float16: (1e-3, 2e-3),
}


@pytest.mark.parametrize("backend", ["torch", "dense"])
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("n", TRANSFORM_SIZES)
@pytest.mark.parametrize("lead", [(), (3,), (2, 3, 5)])
def test_transform_matches_matmul(backend, dtype, n, lead):
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(*lead, n, generator=generator, dtype=torch.float64).to(dtype)
    y = hadamard_transform(x, backend=backend)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    reference = x.to(torch.float64) @ hadamard_matrix(n, torch.float64)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(y.to(torch.float64), reference, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["torch", "dense"])
@pytest.mark.parametrize("n", [12 * 16, 172 * 2, 64])
def test_transform_non_contiguous_input(backend, n):
    # float32 tolerance as above (1e-5): the layout must not matter, only rounding.
    base = torch.randn(n, 6)
    transposed = base.T  # shape (6, n), last-dimension stride 6
    strided = torch.randn(4, 2 * n)[:, ::2]  # last-dimension stride 2
    for x in (transposed, strided):
        assert not x.is_contiguous()
        reference = x.double() @ hadamard_matrix(n, torch.float64)
        torch.testing.assert_close(hadamard_transform(x, backend=backend).double(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [172 * 64, 156 * 64, 40 * 256, 28 * 512])
def test_large_transform_against_independent_columns(n):
    # Checked column by column from the Kronecker formula (no n x n matrix); float32 vs float64: 1e-5 as above.
    x = torch.randn(2, n)
    y = hadamard_transform(x, backend="torch")
    columns = [0, 1, n // 3, n // 2 + 7, n - 1]
    torch.testing.assert_close(y[:, columns].double(), _reference_columns(x, n, columns), rtol=1e-5, atol=1e-5)


def test_transform_is_n_log_n_without_materialising_a_matrix(monkeypatch):
    # A dense 2^16 x 2^16 float32 matrix would need 16 GiB; the torch backend must never build one.
    def forbidden(*args, **kwargs):
        raise AssertionError("dense matrix requested by the fast path")

    monkeypatch.setattr(hadamard, "_dense_float64", forbidden)
    n = 2**16
    x = torch.randn(2, n)
    start = time.perf_counter()
    y = hadamard_transform(x, backend="torch")
    assert time.perf_counter() - start < 5.0  # ~10 ms in practice; generous for a loaded 2-core machine
    # Orthogonal transform keeps norms (float32 over 16 stages: relative 1e-5).
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)
    columns = [0, 1, 12345, n - 1]
    torch.testing.assert_close(y[:, columns].double(), _reference_columns(x, n, columns), rtol=1e-5, atol=1e-5)


def test_transform_is_its_own_structure_inverse():
    # x @ H @ H^T == x; float64 round trip, 1e-12.
    x = torch.randn(3, 172 * 4, dtype=torch.float64)
    h = hadamard_matrix(172 * 4, torch.float64)
    torch.testing.assert_close(hadamard_transform(x) @ h.T, x, rtol=0, atol=1e-12)


def test_size_one_and_empty_inputs():
    x = torch.randn(3, 1)
    y = hadamard_transform(x)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    empty = torch.randn(0, 12)
    assert hadamard_transform(empty).shape == (0, 12)


def test_invalid_inputs():
    with pytest.raises(TypeError):
        hadamard_transform(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError):
        hadamard_transform(torch.tensor(1.0))
    with pytest.raises(TypeError):
        hadamard_transform(torch.ones(4), backend=3)


# ------------------------------------------------------------------------------------------------ autograd


@pytest.mark.parametrize("backend", ["torch", "dense"])
@pytest.mark.parametrize("n", [1, 2, 8, 12, 40, 52, 172])
def test_gradcheck(backend, n):
    # gradcheck's own float64 finite-difference tolerances (eps=1e-6, atol=1e-5) apply; fast_mode checks random
    # Jacobian-vector products instead of the full n x n Jacobian, to keep the suite fast.
    x = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: hadamard_transform(t, backend=backend), (x,), fast_mode=n > 12)


@pytest.mark.parametrize("n", [172 * 2, 12 * 128, 2048])
def test_gradient_is_g_times_h_transpose(n):
    # d/dx sum((x @ H) * g) = g @ H^T exactly in exact arithmetic; float64 rounding only: 1e-12.
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, n, dtype=torch.float64)
    (hadamard_transform(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ hadamard_matrix(n, torch.float64).T, rtol=0, atol=1e-12)


def test_half_precision_gradient_keeps_dtype():
    # bf16 gradient vs float64 reference: bf16 rounding of the result (2^-8 relative), see TOLERANCES.
    x = torch.randn(2, 24, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(2, 24, dtype=torch.float64)
    (hadamard_transform(x).double() * g).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.double(), g @ hadamard_matrix(24, torch.float64).T, rtol=8e-3, atol=1e-2)


# ------------------------------------------------------------------------------------------------ backends


@pytest.fixture
def backend_spy(monkeypatch):
    """Wrap every registered backend so tests can see which one ran."""
    calls: list[str] = []
    spied = {}
    for name, backend in hadamard._BACKENDS.items():

        def transform(x, _name=name, _inner=backend.transform):
            calls.append(_name)
            return _inner(x)

        spied[name] = dataclasses.replace(backend, transform=transform)
    monkeypatch.setattr(hadamard, "_BACKENDS", spied)
    return calls


@pytest.fixture
def no_backend_env(monkeypatch):
    monkeypatch.delenv(hadamard.BACKEND_ENV_VAR, raising=False)


def test_available_backends_here():
    names = available_backends()
    assert "torch" in names and "dense" in names
    if hadamard._fast_hadamard_transform_module() is None:
        assert "fast_hadamard_transform" not in names


def test_auto_uses_torch_on_cpu(backend_spy, no_backend_env):
    hadamard_transform(torch.randn(2, 12))
    hadamard_transform(torch.randn(2, 12), backend="auto")
    assert backend_spy == ["torch", "torch"]


@pytest.mark.parametrize("name", ["dense", "torch", " Dense "])
def test_env_var_forces_backend(backend_spy, monkeypatch, name):
    monkeypatch.setenv(hadamard.BACKEND_ENV_VAR, name)
    hadamard_transform(torch.randn(2, 12))
    assert backend_spy == [name.strip().lower()]


def test_argument_overrides_env_var(backend_spy, monkeypatch):
    monkeypatch.setenv(hadamard.BACKEND_ENV_VAR, "dense")
    hadamard_transform(torch.randn(2, 12), backend="torch")
    assert backend_spy == ["torch"]


def test_unknown_backend_names_raise(monkeypatch):
    monkeypatch.setenv(hadamard.BACKEND_ENV_VAR, "cuda_magic")
    with pytest.raises(ValueError, match=r"SPINQUANT_HADAMARD_BACKEND.*auto.*torch"):
        hadamard_transform(torch.randn(12))
    monkeypatch.delenv(hadamard.BACKEND_ENV_VAR)
    with pytest.raises(ValueError, match=r"backend= argument.*fast_hadamard_transform"):
        hadamard_transform(torch.randn(12), backend="nope")


def test_missing_fast_hadamard_transform_raises_clearly(no_backend_env):
    if hadamard._fast_hadamard_transform_module() is not None:
        pytest.skip("fast_hadamard_transform is installed here")
    with pytest.raises(ImportError, match="fast_hadamard_transform.*not installed"):
        hadamard_transform(torch.randn(12), backend="fast_hadamard_transform")


@pytest.fixture
def fake_fast_hadamard_transform(monkeypatch):
    """A CPU stand-in for the CUDA package with its documented semantics: x @ S_p * scale, Sylvester order."""

    def fake_hadamard_transform(x, scale=1.0):
        p = x.shape[-1]
        sylvester = hadamard_matrix(p, torch.float64) * math.sqrt(p)  # decompose_size(p) == (1, p)
        return (x.double() @ sylvester * scale).to(x.dtype)

    fake_package = SimpleNamespace(hadamard_transform=fake_hadamard_transform)
    monkeypatch.setitem(sys.modules, "fast_hadamard_transform", fake_package)
    hadamard._fast_hadamard_transform_module.cache_clear()
    yield
    hadamard._fast_hadamard_transform_module.cache_clear()


def test_fast_hadamard_transform_backend_layout(fake_fast_hadamard_transform, backend_spy, no_backend_env):
    assert "fast_hadamard_transform" in available_backends()
    # Its composition with the m x m factor reproduces hadamard_matrix (float32 in, float64 ref: 1e-5).
    n = 12 * 64
    x = torch.randn(3, n)
    y = hadamard._BACKENDS["fast_hadamard_transform"].transform(x)
    torch.testing.assert_close(y.double(), x.double() @ hadamard_matrix(n, torch.float64), rtol=1e-5, atol=1e-5)
    # CPU tensors: auto falls back to torch, an explicit request explains the CUDA requirement.
    backend_spy.clear()
    hadamard_transform(x)
    assert backend_spy == ["torch"]
    with pytest.raises(ValueError, match="CUDA"):
        hadamard_transform(x, backend="fast_hadamard_transform")


def test_register_backend(monkeypatch, no_backend_env):
    monkeypatch.setattr(hadamard, "_BACKENDS", dict(hadamard._BACKENDS))
    calls = []

    def recording(x):
        calls.append(x.shape)
        return hadamard._torch_backend(x)

    register_backend("recording", recording)
    assert "recording" in available_backends()
    hadamard_transform(torch.randn(2, 20), backend="recording")
    assert calls == [(2, 20)]
    register_backend("preferred", recording, supports=lambda x: x.shape[-1] == 20, auto_priority=1000)
    hadamard_transform(torch.randn(20))
    hadamard_transform(torch.randn(24))  # not supported by "preferred": auto falls through to torch
    assert calls == [(2, 20), (20,)]
    register_backend("missing", recording, lambda: False, requirement="package xyz is not installed")
    assert "missing" not in available_backends()
    with pytest.raises(ImportError, match="xyz"):
        hadamard_transform(torch.randn(20), backend="missing")
    with pytest.raises(ValueError):
        register_backend("auto", recording)


def test_no_warning_for_supported_sizes():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hadamard_matrix(172 * 8)
        hadamard_transform(torch.randn(2, 156 * 8))
