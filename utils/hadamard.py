"""Hadamard matrices and the fast Walsh-Hadamard transform: the project's single home for both.

SpinQuant's fixed rotations (R3 on queries/keys, R4 before ``down_proj``, and the Hadamard initialisation of
R1/R2) are normalised Hadamard matrices of size ``n``. The same matrix is used twice: merged into weights offline
(:func:`hadamard_matrix`) and applied to activations online (:func:`hadamard_transform`). Both are derived here
from one factorisation, so they agree by construction (``hadamard_matrix(n) == hadamard_transform(eye(n))``).

Layout. For ``n = m * p`` (``p`` a power of two, ``m`` from :data:`SUPPORTED_FACTORS`, see
:func:`decompose_size`)::

    hadamard_matrix(n) = kron(H_m, S_p) / sqrt(n)

with ``H_m`` from :func:`hadamard_factor` and ``S_p`` the Sylvester matrix in natural order
(``S_2k = [[S_k, S_k], [S_k, -S_k]]``, the convention of the CUDA package ``fast_hadamard_transform``). For a row
vector ``x`` viewed as an ``m x p`` matrix ``X``, ``x @ H = H_m^T X S_p / sqrt(n)``: a fast transform along the
contiguous axis of length ``p``, then one small ``m x m`` matmul (the layout QuaRot/SpinQuant use online).

Constructions of the factors ``H_m`` (all built in code, all checked ``H H^T == m I`` at build time):

* 1, 2: trivial / Sylvester (1867).
* 12, 20, 44, 60, 108, 140: Paley I (Paley 1933) from GF(q), q = 11, 19, 43, 59, 107, 139 (q = 3 mod 4).
* 28, 36, 52: Paley II (Paley 1933) from GF(q), q = 13, 17, 25 (q = 1 mod 4; GF(25) is a real extension field).
* 40: Sylvester doubling of the order-20 Paley matrix.
* 156 = 4 * 39: Williamson matrices of order 13 from Turyn's infinite family (R. J. Turyn, "An infinite class of
  Williamson matrices", J. Combin. Theory A 12, 1972) built over GF(625) = GF(25^2), stretched to order 39 with
  the T-matrices of order 3 (J. Cooper and J. Wallis, "A construction for Hadamard arrays", Bull. Austral. Math.
  Soc. 7, 1972) and put into the Goethals-Seidel array (Goethals and Seidel, "A skew Hadamard matrix of order 36",
  J. Austral. Math. Soc. 11, 1970).
* 172 = 4 * 43: Williamson's own construction (J. Williamson, "Hadamard's determinant theorem and the sum of four
  squares", Duke Math. J. 11, 1944): four symmetric circulant matrices of order 43 whose -1 positions are unions
  of cyclotomic classes of order 7 in Z_43 (orbits of the multiplier subgroup of order 6, which contains -1, so the
  matrices are symmetric), in the Williamson array. The choice of classes is found by a small exhaustive search
  (2^8 unions per matrix, a few tens of milliseconds), using that the autocorrelation of such a union is constant
  on cyclotomic classes.

Sizes that do not split as ``m * 2^k`` get the Sylvester part combined with a seeded random orthogonal factor
(with a warning), see :func:`hadamard_matrix`.

Backends of :func:`hadamard_transform` live in one registry (:func:`register_backend`); choose one with
``backend=`` or the environment variable ``SPINQUANT_HADAMARD_BACKEND``. "auto" takes the CUDA package
``fast_hadamard_transform`` when installed, else our Triton kernels (:mod:`utils.hadamard_triton`) on CUDA, else
the PyTorch transform. :func:`hadamard_quantize` is the transform followed by the activation quantizer, fused
into one kernel where the backend has one (Triton).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .quant import QuantSpec, fake_quantize

__all__ = [
    "SUPPORTED_FACTORS",
    "BACKEND_ENV_VAR",
    "hadamard_factor",
    "decompose_size",
    "hadamard_matrix",
    "hadamard_transform",
    "hadamard_quantize",
    "available_backends",
    "register_backend",
]

SUPPORTED_FACTORS: tuple[int, ...] = (1, 12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 156, 172)

BACKEND_ENV_VAR = "SPINQUANT_HADAMARD_BACKEND"
AUTO_BACKEND = "auto"

# Seed base of the random orthogonal factor used for sizes without a Hadamard matrix; the seed is this plus n,
# so the factor is the same in every process (weights merged in one process, online transform in another).
_FALLBACK_SEED_BASE = 1_000_003
# The CUDA package fast_hadamard_transform handles power-of-two sizes up to 2^15.
_FAST_HADAMARD_TRANSFORM_MAX_DIM = 2**15


# ----------------------------------------------------------------------------------------------------------------
# Small finite fields GF(p^k)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GaloisField:
    """GF(p^k) with elements encoded as ints whose base-p digits are polynomial coefficients (low degree first).

    ``power[i]`` is ``g^i`` for a primitive element ``g``; ``log`` inverts it. The quadratic character of a
    non-zero element is the parity of its discrete logarithm.
    """

    p: int
    k: int
    power: tuple[int, ...]
    log: dict[int, int]

    @property
    def order(self) -> int:
        return self.p**self.k

    def sub(self, a: int, b: int) -> int:
        result, place = 0, 1
        for _ in range(self.k):
            result += ((a // place - b // place) % self.p) * place
            place *= self.p
        return result

    def quadratic_character(self, a: int) -> int:
        return 0 if a == 0 else 1 - 2 * (self.log[a] % 2)


def _prime_power(q: int) -> tuple[int, int]:
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k, rest = 0, q
    while rest % p == 0:
        rest //= p
        k += 1
    if rest != 1:
        raise ValueError(f"{q} is not a prime power")
    return p, k


@functools.lru_cache(maxsize=None)
def _galois_field(q: int) -> _GaloisField:
    """Find a primitive polynomial of degree k over GF(p) by search; x is then a primitive element.

    If the powers of x modulo a monic f run through q - 1 distinct values before returning to 1, every non-zero
    residue is a unit, so f is irreducible and the residues form GF(q) with the power table for free.
    """
    p, k = _prime_power(q)
    one = (1,) + (0,) * (k - 1)
    for low_coefficients in itertools.product(range(p), repeat=k):
        if low_coefficients[0] == 0:
            continue
        # f = x^k + sum_i c_i x^i, so x^k = -sum_i c_i x^i.
        reduction = [(-c) % p for c in low_coefficients]
        powers, current = [], one
        for _ in range(q - 1):
            powers.append(current)
            top = current[-1]
            shifted = (0,) + current[:-1]
            current = tuple((shifted[i] + top * reduction[i]) % p for i in range(k))
            if current == one:
                break
        if current == one and len(powers) == q - 1:
            encoded = tuple(sum(c * p**i for i, c in enumerate(v)) for v in powers)
            return _GaloisField(p, k, encoded, {e: i for i, e in enumerate(encoded)})
    raise RuntimeError(f"no primitive polynomial found for GF({q})")  # unreachable: one always exists


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (integer matrices)
# ----------------------------------------------------------------------------------------------------------------


def _circulant(first_row: list[int]) -> torch.Tensor:
    n = len(first_row)
    return torch.tensor([[first_row[(j - i) % n] for j in range(n)] for i in range(n)], dtype=torch.int64)


def _reversal(n: int) -> torch.Tensor:
    """Back-diagonal identity R: for a circulant M, M R is symmetric and R M^T R = M (Goethals-Seidel needs it)."""
    return torch.eye(n, dtype=torch.int64).flip(1)


def _blocks(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    return torch.cat([torch.cat(row, dim=1) for row in rows], dim=0)


def _sylvester_2() -> torch.Tensor:
    return torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)


def _paley_type_1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime power q = 3 mod 4: H = I + [[0, 1^T], [-1, Q]], Q[a, b] = chi(a - b).

    chi(-1) = -1, so the Jacobsthal matrix Q is skew and Q Q^T = q I - J, which makes H Hadamard.
    """
    field = _galois_field(q)
    jacobsthal = [[field.quadratic_character(field.sub(a, b)) for b in range(q)] for a in range(q)]
    core = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    core[0, 1:] = 1
    core[1:, 0] = -1
    core[1:, 1:] = torch.tensor(jacobsthal, dtype=torch.int64)
    return core + torch.eye(q + 1, dtype=torch.int64)


def _paley_type_2(q: int) -> torch.Tensor:
    """Order 2(q + 1) for a prime power q = 1 mod 4, from the symmetric conference matrix C of order q + 1.

    C = [[0, 1^T], [1, Q]] satisfies C^2 = q I; replacing 0 by [[1, -1], [-1, -1]] and +-1 by +-[[1, 1], [1, -1]]
    gives a Hadamard matrix.
    """
    field = _galois_field(q)
    jacobsthal = [[field.quadratic_character(field.sub(a, b)) for b in range(q)] for a in range(q)]
    conference = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    conference[0, 1:] = 1
    conference[1:, 0] = 1
    conference[1:, 1:] = torch.tensor(jacobsthal, dtype=torch.int64)
    zero_block = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(conference, _sylvester_2()) + torch.kron(torch.eye(q + 1, dtype=torch.int64), zero_block)


def _williamson_array(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Williamson (1944): Hadamard of order 4n from symmetric, pairwise commuting A..D with sum of squares 4n I."""
    return _blocks([[a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a]])


def _goethals_seidel_array(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, reversal: torch.Tensor
) -> torch.Tensor:
    """Goethals-Seidel (1970): like Williamson's array, but A..D only need to be developed over one abelian group
    (e.g. circulant), not symmetric; ``reversal`` is the matching back-diagonal matrix R."""
    r = reversal
    return _blocks(
        [
            [a, b @ r, c @ r, d @ r],
            [-b @ r, a, d.T @ r, -c.T @ r],
            [-c @ r, -d.T @ r, a, b.T @ r],
            [-d @ r, c.T @ r, -b.T @ r, a],
        ]
    )


def _turyn_williamson_quadruple(q: int) -> tuple[torch.Tensor, ...]:
    """Williamson matrices of order n = (q + 1) / 2 for a prime power q = 1 mod 4 (Turyn 1972).

    The points of the projective line over F = GF(q) are the cosets w F* of K* = GF(q^2)*; the symmetric conference
    matrix is C[z, w] = chi(B(z, w)) with the alternating form B(z, w) = (z w^q - z^q w) / delta (delta^q = -delta,
    so B is F-valued). Multiplying both points by rho = omega^(q+3) (a square norm) preserves C, so ordering the
    points as rho^i and rho^(i - (n+1)/2) omega gives C = [[P, Q], [Q, -P]] with P, Q symmetric circulant, zero
    diagonal P and P^2 + Q^2 = q I. Then A = I + P, B = I - P, C = D = Q satisfy A^2 + B^2 + C^2 + D^2 = 4n I.
    """
    big = _galois_field(q * q)
    order = q * q - 1
    n = (q + 1) // 2

    def chi_of_form_with_one(log_w: int) -> int:
        # chi_F(B(1, w)) with w = omega^log_w, delta = omega^((q+1)/2); F* = <omega^(q+1)>.
        difference = big.sub(big.power[(log_w * q) % order], big.power[log_w % order])
        if difference == 0:
            return 0
        log_b = (big.log[difference] - (q + 1) // 2) % order
        return 1 - 2 * ((log_b // (q + 1)) % 2)

    shift = (n + 1) // 2
    p_row = [chi_of_form_with_one((q + 3) * d) for d in range(n)]
    q_row = [chi_of_form_with_one((q + 3) * ((d - shift) % n) + 1) for d in range(n)]
    identity = torch.eye(n, dtype=torch.int64)
    p_matrix, q_matrix = _circulant(p_row), _circulant(q_row)
    return identity + p_matrix, identity - p_matrix, q_matrix, q_matrix


def _cyclotomic_williamson_quadruple(v: int, e: int) -> tuple[torch.Tensor, ...]:
    """Williamson matrices of prime order v whose -1 entries are unions of cyclotomic classes of order e (and
    possibly 0), Williamson's 1944 method. Requires (v - 1) / e even so that -1 lies in the class subgroup and the
    circulants are symmetric.

    The periodic autocorrelation of such a +-1 sequence is constant on each cyclotomic class, so each candidate is
    summarised by e numbers and a quadruple is found by matching pair sums (meet in the middle).
    """
    generator = next(g for g in range(2, v) if len({pow(g, i, v) for i in range(v - 1)}) == v - 1)
    class_size = (v - 1) // e
    classes = [[pow(generator, e * j + i, v) for j in range(class_size)] for i in range(e)]

    def sequence(selected: tuple[int, ...], with_zero: bool) -> list[int]:
        row = [1] * v
        for i in selected:
            for x in classes[i]:
                row[x] = -1
        if with_zero:
            row[0] = -1
        return row

    def autocorrelation_per_class(row: list[int]) -> tuple[int, ...]:
        return tuple(sum(row[x] * row[(x + cls[0]) % v] for x in range(v)) for cls in classes)

    candidates = []  # complements only flip the sign, so keep rows with positive sum
    for size in range(e + 1):
        for selected in itertools.combinations(range(e), size):
            for with_zero in (False, True):
                row = sequence(selected, with_zero)
                if sum(row) > 0:
                    candidates.append((row, autocorrelation_per_class(row)))
    pair_sums: dict[tuple[int, ...], tuple[int, int]] = {}
    for i, j in itertools.combinations_with_replacement(range(len(candidates)), 2):
        key = tuple(x + y for x, y in zip(candidates[i][1], candidates[j][1]))
        pair_sums.setdefault(key, (i, j))
    for key, (i, j) in pair_sums.items():
        match = pair_sums.get(tuple(-x for x in key))
        if match is not None:
            rows = [candidates[k][0] for k in (i, j, *match)]
            return tuple(_circulant(row) for row in rows)
    raise RuntimeError(f"no cyclotomic Williamson quadruple of order {v} with classes of order {e}")


def _order_156() -> torch.Tensor:
    """4 * 39: Turyn's Williamson matrices of order 13 (q = 25) times the T-matrices of order 3 (the three cyclic
    shifts, T4 = 0), X_i = sum_j T_j (x) W_ij with W the Williamson array, in the Goethals-Seidel array."""
    williamson = _turyn_williamson_quadruple(25)
    a, b, c, d = williamson
    array = [[a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a]]
    t_matrices = [_circulant([1 if k == j else 0 for k in range(3)]) for j in range(3)]
    plugged = [sum(torch.kron(t, array[i][j]) for j, t in enumerate(t_matrices)) for i in range(4)]
    return _goethals_seidel_array(*plugged, torch.kron(_reversal(3), _reversal(13)))


_FACTOR_BUILDERS: dict[int, Callable[[], torch.Tensor]] = {
    1: lambda: torch.ones(1, 1, dtype=torch.int64),
    2: _sylvester_2,
    12: lambda: _paley_type_1(11),
    20: lambda: _paley_type_1(19),
    28: lambda: _paley_type_2(13),
    36: lambda: _paley_type_2(17),
    40: lambda: torch.kron(_sylvester_2(), _paley_type_1(19)),
    44: lambda: _paley_type_1(43),
    52: lambda: _paley_type_2(25),
    60: lambda: _paley_type_1(59),
    108: lambda: _paley_type_1(107),
    140: lambda: _paley_type_1(139),
    156: _order_156,
    172: lambda: _williamson_array(*_cyclotomic_williamson_quadruple(43, 7)),
}


@functools.lru_cache(maxsize=None)
def _built_factor(m: int) -> torch.Tensor:
    if m not in _FACTOR_BUILDERS:
        raise ValueError(f"no Hadamard factor of order {m}; supported: {sorted(_FACTOR_BUILDERS)}")
    h = _FACTOR_BUILDERS[m]()
    # Explicit check (not `assert`, which -O strips): a wrong construction must never be returned silently.
    is_hadamard = h.shape == (m, m) and bool((h.abs() == 1).all())
    if not (is_hadamard and torch.equal(h @ h.T, m * torch.eye(m, dtype=h.dtype))):
        raise RuntimeError(f"construction of the Hadamard factor of order {m} is wrong (H H^T != {m} I)")
    return h.to(torch.float64)


def hadamard_factor(m: int) -> torch.Tensor:
    """m x m matrix with entries +-1 and H H^T = m I, for m in SUPPORTED_FACTORS (and 2). Cached.

    Returned as float64 (exact for these integers) and as a fresh copy, so callers cannot corrupt the cache.
    """
    return _built_factor(m).clone()


# ----------------------------------------------------------------------------------------------------------------
# Sizes, dense matrices
# ----------------------------------------------------------------------------------------------------------------


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def decompose_size(n: int) -> tuple[int, int] | None:
    """(m, p) with n == m * p, m in SUPPORTED_FACTORS, p a power of two; None if no such split. Prefer the smallest m.

    The smallest m puts as much as possible into the O(n log n) power-of-two part.
    """
    if n < 1:
        return None
    for m in sorted(SUPPORTED_FACTORS):
        if n % m == 0 and _is_power_of_two(n // m):
            return m, n // m
    return None


@dataclass(frozen=True)
class _Plan:
    """n = m * p; ``factor`` is the orthonormal m x m factor (H_m / sqrt(m), or a seeded random one)."""

    m: int
    p: int
    factor: torch.Tensor
    is_hadamard: bool


def _seeded_orthogonal(n: int, m: int) -> torch.Tensor:
    """Haar-random m x m orthogonal matrix from a seed derived from n only (never the global RNG), so every process
    builds the same matrix."""
    generator = torch.Generator(device="cpu").manual_seed(_FALLBACK_SEED_BASE + n)
    gaussian = torch.randn(m, m, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).contiguous()  # sign fix makes the QR factor unique


@functools.lru_cache(maxsize=64)
def _plan(n: int) -> _Plan:
    if n < 1:
        raise ValueError(f"Hadamard size must be positive, got {n}")
    split = decompose_size(n)
    if split is not None:
        m, p = split
        return _Plan(m, p, _built_factor(m) / math.sqrt(m), True)
    p = n & -n  # largest power of two dividing n
    return _Plan(n // p, p, _seeded_orthogonal(n, n // p), False)


def _warn_if_not_hadamard(n: int, plan: _Plan) -> None:
    if not plan.is_hadamard:
        warnings.warn(
            f"no Hadamard matrix of order n={n} is available (n = {plan.m} * {plan.p}, {plan.m} not in "
            f"SUPPORTED_FACTORS); using the Sylvester {plan.p} part combined with a seeded random {plan.m}x{plan.m} "
            "orthogonal factor (deterministic, seed derived from n)",
            stacklevel=3,
        )


@functools.lru_cache(maxsize=8)
def _dense_float64(n: int) -> torch.Tensor:
    plan = _plan(n)
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < plan.p:
        sylvester = torch.kron(_sylvester_2().to(torch.float64), sylvester)
    return torch.kron(plan.factor, sylvester / math.sqrt(plan.p))


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Orthogonal n x n matrix H (normalised, H^T H = I) such that hadamard_transform(x) == x @ H.

    H = kron(H_m, S_p) / sqrt(n) for (m, p) = decompose_size(n). For n that decompose_size cannot split, the
    Sylvester part of the largest power of two dividing n is combined with a random orthogonal factor of the rest,
    generated from a FIXED seed derived from n (weights merged with H in one process and online transforms in
    another must agree), and a warning naming n is issued. Cached per n in float64 (a few entries), cast on return
    into a fresh tensor.
    """
    plan = _plan(n)
    _warn_if_not_hadamard(n, plan)
    return _dense_float64(n).to(dtype=dtype, device=device, copy=True)


# ----------------------------------------------------------------------------------------------------------------
# Transform and backends
# ----------------------------------------------------------------------------------------------------------------


def _butterfly_fwht(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x @ S_p * scale over the last dimension (p a power of two), log2(p) out-of-place butterfly stages, so
    autograd works and nothing of size p x p is ever built."""
    shape, p = x.shape, x.shape[-1]
    rows = x.numel() // p
    y = x.reshape(rows, p)
    half = 1
    while half < p:
        pairs = y.reshape(rows, p // (2 * half), 2, half)
        first, second = pairs[:, :, 0, :], pairs[:, :, 1, :]
        y = torch.stack((first + second, first - second), dim=2)
        half *= 2
    return (y * scale).reshape(shape)


@functools.lru_cache(maxsize=64)
def _left_factor(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """F^T of n's plan, cast once per (dtype, device) instead of on every call."""
    return _plan(n).factor.T.contiguous().to(dtype=dtype, device=device)


def _factored_transform(
    x: torch.Tensor, power_of_two_fwht: Callable[[torch.Tensor, float], torch.Tensor]
) -> torch.Tensor:
    """x @ kron(F, S_p / sqrt(p)): view x as (..., m, p), transform the p axis, then multiply by F^T on the m axis.

    Any backend that provides only a Sylvester FWHT over the last dimension reuses this for all sizes.
    """
    n = x.shape[-1]
    plan = _plan(n)
    y = x.reshape(x.numel() // n, plan.m, plan.p)
    if plan.p > 1:
        y = power_of_two_fwht(y, 1.0 / math.sqrt(plan.p))
    if plan.m > 1:
        y = torch.matmul(_left_factor(n, y.dtype, y.device), y)
    if plan.p == 1 and plan.m == 1:
        y = y.clone()  # never hand back a view of the input
    return y.reshape(x.shape)


def _torch_backend(x: torch.Tensor) -> torch.Tensor:
    return _factored_transform(x, _butterfly_fwht)


def _dense_backend(x: torch.Tensor) -> torch.Tensor:
    return torch.matmul(x, _dense_float64(x.shape[-1]).to(dtype=x.dtype, device=x.device))


@functools.lru_cache(maxsize=1)
def _fast_hadamard_transform_module():
    """Import the optional CUDA package lazily; None when it is missing or cannot load its CUDA library."""
    try:
        import fast_hadamard_transform
    except (ImportError, OSError):
        return None
    return fast_hadamard_transform


def _fast_hadamard_transform_available() -> bool:
    return _fast_hadamard_transform_module() is not None


def _fast_hadamard_transform_supports(x: torch.Tensor) -> bool:
    plan = _plan(x.shape[-1])
    return x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and (
        plan.p <= _FAST_HADAMARD_TRANSFORM_MAX_DIM
    )


def _fast_hadamard_transform_backend(x: torch.Tensor) -> torch.Tensor:
    package = _fast_hadamard_transform_module()
    return _factored_transform(x, lambda y, scale: package.hadamard_transform(y.contiguous(), scale))


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.lru_cache(maxsize=1)
def _triton_module():
    """utils.hadamard_triton, imported on first use; None when Triton is missing or fails to import."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        from . import hadamard_triton
    except (ImportError, OSError, RuntimeError):
        return None
    return hadamard_triton


def _triton_available() -> bool:
    # Only where the kernels can run: a CUDA device, or Triton's CPU interpreter (tests). Checked before importing.
    return (torch.cuda.is_available() or _triton_interpreting()) and _triton_module() is not None


def _triton_supports(x: torch.Tensor) -> bool:
    return _triton_module().supports(x)


def _triton_auto_supports(x: torch.Tensor) -> bool:
    return x.is_cuda and _triton_module().supports(x)  # never the (slow) interpreter unless asked for by name


def _triton_backend(x: torch.Tensor) -> torch.Tensor:
    return _triton_module().hadamard_transform(x)


def _triton_quantize(x: torch.Tensor, spec: QuantSpec, fp32: bool) -> torch.Tensor | None:
    module = _triton_module()
    return module.hadamard_quantize(x, spec, fp32=fp32) if module.supports_quantize(x, spec) else None


@dataclass(frozen=True)
class _Backend:
    transform: Callable[[torch.Tensor], torch.Tensor]
    available: Callable[[], bool]
    supports: Callable[[torch.Tensor], bool]
    auto_priority: int | None
    requirement: str
    limits: str = ""
    auto_supports: Callable[[torch.Tensor], bool] | None = None  # None: same as supports
    native_dtypes: tuple[torch.dtype, ...] = ()
    quantize: Callable[[torch.Tensor, QuantSpec, bool], torch.Tensor | None] | None = None


_BACKENDS: dict[str, _Backend] = {}


def register_backend(
    name: str,
    fn: Callable[[torch.Tensor], torch.Tensor],
    available: Callable[[], bool] = lambda: True,
    *,
    supports: Callable[[torch.Tensor], bool] = lambda x: True,
    auto_priority: int | None = None,
    requirement: str = "",
    limits: str = "",
    auto_supports: Callable[[torch.Tensor], bool] | None = None,
    native_dtypes: tuple[torch.dtype, ...] = (),
    quantize: Callable[[torch.Tensor, QuantSpec, bool], torch.Tensor | None] | None = None,
) -> None:
    """Add (or replace) a transform backend; the one place a new kernel plugs in.

    ``fn(x)`` must return ``x @ hadamard_matrix(x.shape[-1])`` for a float32/float64 tensor of any leading shape
    (``_factored_transform`` turns a power-of-two FWHT into that). ``available()`` says whether its dependencies
    import, ``supports(x)`` whether it handles this tensor (device, dtype, size), ``limits`` says what it needs in
    words for the error message. With ``auto_priority`` set, "auto" considers it, highest priority first, where
    ``auto_supports(x)`` (default ``supports``) holds. ``requirement`` explains what is missing when it is
    unavailable. Dtypes in ``native_dtypes`` are passed as they are (``fn`` then computes in float32 and returns
    x's dtype, saving the casts' memory traffic). ``quantize(x, spec, fp32)``, if given, is the fused
    :func:`hadamard_quantize` for a native-dtype ``x``; it returns None for a spec it cannot fuse.
    """
    if name == AUTO_BACKEND:
        raise ValueError(f"'{AUTO_BACKEND}' is reserved for automatic backend selection")
    _BACKENDS[name] = _Backend(
        fn, available, supports, auto_priority, requirement, limits, auto_supports, native_dtypes, quantize
    )


def available_backends() -> list[str]:
    """Names of the registered backends whose dependencies are importable here (usable with ``backend=``)."""
    return [name for name, backend in _BACKENDS.items() if backend.available()]


register_backend("torch", _torch_backend, auto_priority=0)
register_backend("dense", _dense_backend)
register_backend(
    "fast_hadamard_transform",
    _fast_hadamard_transform_backend,
    _fast_hadamard_transform_available,
    supports=_fast_hadamard_transform_supports,
    auto_priority=100,
    requirement="the optional CUDA package 'fast_hadamard_transform' is not installed (or failed to import)",
    limits="a CUDA tensor with a power-of-two part <= 2^15",
)
register_backend(
    "triton",
    _triton_backend,
    _triton_available,
    supports=_triton_supports,
    auto_priority=50,
    requirement="Triton is not installed, or there is no CUDA device (set TRITON_INTERPRET=1 for its CPU interpreter)",
    limits="a float16/bfloat16/float32 CUDA tensor with n = m * 2^k, m a Hadamard factor, 2^k <= 2^15 (>= 16 if m > 1)",
    auto_supports=_triton_auto_supports,
    native_dtypes=(torch.float16, torch.bfloat16, torch.float32),
    quantize=_triton_quantize,
)


def _select_backend(x: torch.Tensor, requested: str | None) -> _Backend:
    if requested is not None:
        name, source = requested, "the backend= argument"
    else:
        name = os.environ.get(BACKEND_ENV_VAR, "") or AUTO_BACKEND
        source = f"the environment variable {BACKEND_ENV_VAR}"
    name = name.strip().lower()
    if name == AUTO_BACKEND:
        candidates = sorted(
            (b for b in _BACKENDS.values() if b.auto_priority is not None), key=lambda b: -b.auto_priority
        )
        for backend in candidates:
            if backend.available() and (backend.auto_supports or backend.supports)(x):
                return backend
        raise RuntimeError(f"no Hadamard backend can handle a {x.dtype} tensor on {x.device}")
    if name not in _BACKENDS:
        valid = ", ".join([AUTO_BACKEND, *_BACKENDS])
        raise ValueError(f"unknown Hadamard backend {name!r} (from {source}); valid values: {valid}")
    backend = _BACKENDS[name]
    if not backend.available():
        raise ImportError(f"Hadamard backend {name!r} (from {source}) is unavailable: {backend.requirement}")
    if not backend.supports(x):
        raise ValueError(
            f"Hadamard backend {name!r} (from {source}) cannot handle a {x.dtype} tensor on {x.device} with last "
            f"dimension {x.shape[-1]} (it needs {backend.limits or 'a CUDA tensor of a supported dtype and size'}); "
            "use 'auto' or 'torch'"
        )
    return backend


def _check_input(x: torch.Tensor, backend: str | None, what: str) -> None:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} needs a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{what} needs at least one dimension")


def hadamard_transform(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Return x @ hadamard_matrix(n) over the last dimension (n = x.shape[-1]) in O(n log n) time.

    Any leading shape, non-contiguous input OK, differentiable (autograd), same dtype and device as x. float16 and
    bfloat16 are computed in float32 and cast back (as the CUDA package fast_hadamard_transform does), because the
    log2(n) butterfly stages would otherwise accumulate half-precision rounding. ``backend`` (or the environment
    variable SPINQUANT_HADAMARD_BACKEND) picks the implementation: "auto" (default), "torch", "dense",
    "fast_hadamard_transform", "triton", or any name added with :func:`register_backend`.
    """
    _check_input(x, backend, "hadamard_transform")
    n = x.shape[-1]
    plan = _plan(n)
    _warn_if_not_hadamard(n, plan)
    chosen = _select_backend(x, backend)
    if x.numel() == 0:
        return x.clone()
    if x.dtype in chosen.native_dtypes:
        return chosen.transform(x)
    compute_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return chosen.transform(x.to(compute_dtype)).to(x.dtype)


def hadamard_quantize(
    x: torch.Tensor, spec: QuantSpec, *, fp32: bool = False, backend: str | None = None
) -> torch.Tensor:
    """``fake_quantize(hadamard_transform(x), spec)``: an online Hadamard (R3, R4) followed by the dynamic per-token
    (or per-group) activation quantizer, in one pass over memory where the backend has a fused kernel (Triton).

    Same values as the composition wherever the backend's transform is bit-identical to it (power-of-two sizes);
    otherwise the transform differs by float32 rounding, which can move a value lying on a rounding boundary by one
    quantization step. ``fp32=True`` is the paper's ``--fp32_had``: transform and quantize in float32, return x's
    dtype. Differentiable: the quantizer's gradient is the identity (straight-through), so the gradient is the
    Hadamard's. Specs the fused kernel cannot handle (e.g. groups spanning the non-power-of-two factor) fall back to
    the composition.
    """
    _check_input(x, backend, "hadamard_quantize")
    if spec.enabled and x.numel() > 0:
        chosen = _select_backend(x, backend)
        if chosen.quantize is not None and x.dtype in chosen.native_dtypes:
            fused = chosen.quantize(x, spec, fp32)
            if fused is not None:
                return fused
    if fp32 and spec.enabled and x.dtype in (torch.float16, torch.bfloat16):
        return fake_quantize(hadamard_transform(x.float(), backend=backend), spec).to(x.dtype)
    return fake_quantize(hadamard_transform(x, backend=backend), spec)
