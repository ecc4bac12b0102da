"""Cayley SGD on the Stiefel manifold: the optimizer SpinQuant learns R1 and R2 with.

Written from Li, Li and Todorovic, "Efficient Riemannian Optimization on the Stiefel Manifold via the Cayley
Transform" (ICLR 2020), Algorithm 1 ("Cayley SGD with momentum"). A parameter ``R`` is a ``p x n`` matrix with
orthonormal rows (``p <= n``; SpinQuant's rotations are square). The algorithm works on ``X = R^T`` (orthonormal
columns) and the Euclidean gradient ``G = (dL/dR)^T``, with momentum ``beta``, learning rate ``l`` and ``q = 1/2``::

    M  <- beta M - G                            momentum (zero before the first step)
    W^  = M X^T - 1/2 X (X^T M X^T)
    W   = W^ - W^T                              skew-symmetric generator (n x n)
    M  <- W X                                   momentum projected onto the tangent space at X
    a   = min(l, 2q / (||W||_1 + eps))          adaptive step; ||.||_1 is the largest column sum of |W|
    Y  <- X + a M
    s times:  Y <- X + a/2 W (X + Y)            fixed-point iteration of the Cayley transform
    X  <- Y

The fixed point of the iteration is the Cayley transform ``(I - a/2 W)^-1 (I + a/2 W) X``, which keeps ``X^T X = I``
exactly. The iteration map is a contraction with factor ``a/2 ||W||_2 <= a/2 ||W||_1 <= q = 1/2`` (for a
skew-symmetric W the spectral norm is at most the 1-norm), so each iteration at least halves the distance to it.
With ``theta = a ||W||_2 <= 1`` the first guess is ``theta^2 / 2`` from the fixed point and after ``s`` iterations
``||Y - Cayley(X)||_2 <= (theta / 2)^s theta^2 / 2`` (at most 1/64 for the default s = 5, and far less in practice,
where ``||W||_2`` is much smaller than ``||W||_1``); so one step moves ``X^T X`` at most twice that away from ``I``.

As in the SpinQuant paper's code (and Li et al.'s reference code): 5 iterations, ``q = 1/2`` (step
``min(lr, 1 / ||W||_1)``), rows renormalised to unit length before each step (a free first-order correction of
drift), and an optional QR re-orthonormalisation. The paper's code runs QR at random (1 step in ~100); here it is
deterministic -- every ``qr_every`` steps, and whenever ``max |R R^T - I|`` exceeds ``orthogonality_tol`` -- so
runs are reproducible and every rank of a distributed run takes identical steps. One deliberate difference from the
paper's code: the first guess of the iteration is ``X + a W X`` (Algorithm 1 as published) rather than ``X + a M``
with the unprojected momentum; both iterate to the same Cayley point, the published one from closer.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch.optim import Optimizer

__all__ = ["CayleySGD", "cayley_step", "qr_retraction", "orthogonality_error", "matrix_one_norm"]


def matrix_one_norm(w: torch.Tensor) -> torch.Tensor:
    """Induced 1-norm: the largest column sum of ``|w|`` (0-dim tensor)."""
    return w.abs().sum(dim=0).amax()


def orthogonality_error(rows: torch.Tensor) -> torch.Tensor:
    """``max |R R^T - I|`` for a matrix with (supposedly) orthonormal rows (0-dim tensor)."""
    gram = rows @ rows.T
    return (gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).abs().amax()


def qr_retraction(rows: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal rows closest in the QR sense: QR of ``R^T`` with the signs of diag(r) fixed."""
    q, r = torch.linalg.qr(rows.T)
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (q * signs.unsqueeze(0)).T


def cayley_step(
    rows: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    momentum_buffer: torch.Tensor | None = None,
    momentum: float = 0.0,
    iterations: int = 5,
    q: float = 0.5,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Cayley SGD step of Algorithm 1 for ``rows`` (``p x n``, orthonormal rows) and its gradient.

    Returns ``(new_rows, new_momentum, step_size)``: ``new_momentum`` is the projected ``W X`` (``n x p``) to pass
    back as ``momentum_buffer``; ``step_size`` is the ``a`` actually used (0-dim tensor, no host sync).
    """
    x = rows.T
    m = -grad.T
    if momentum_buffer is not None and momentum != 0.0:
        m = m + momentum * momentum_buffer
    m_xt = m @ x.T
    w_hat = m_xt - 0.5 * (x @ (x.T @ m_xt))
    w = w_hat - w_hat.T
    step = torch.clamp(2.0 * q / (matrix_one_norm(w) + eps), max=lr)
    m = w @ x
    y = x + step * m
    half = 0.5 * step
    for _ in range(iterations):
        y = x + half * (w @ (x + y))
    return y.T, m, step


class CayleySGD(Optimizer):
    """Cayley SGD (Li et al., ICLR 2020) for 2-D parameters with orthonormal rows, e.g. rotation matrices.

    Args:
        params: the rotations (``p x n`` with ``p <= n``; square for SpinQuant).
        lr: the largest step; the step actually taken is ``min(lr, 2q / ||W||_1)``.
        momentum: heavy-ball factor ``beta`` (0 in SpinQuant).
        iterations: fixed-point iterations of the Cayley transform (5 in SpinQuant).
        q: step-size bound factor (1/2 in the paper, giving ``min(lr, 1 / ||W||_1)``).
        eps: keeps the step finite for a zero gradient.
        renormalize_rows: scale rows to unit length before each step (the paper's code does).
        qr_every: QR re-orthonormalisation every this many steps of a parameter (0: never).
        orthogonality_tol: after a step, QR re-orthonormalise a parameter whose ``max |R R^T - I|`` exceeds this
            (None: never check). One small matmul per parameter and one host sync per step.

    ``weight_decay`` is not offered: a rotation's norm is fixed, so an L2 penalty has no meaning on the manifold.
    After :meth:`step`, ``last_step_sizes`` holds each parameter's step size ``a`` and ``last_orthogonality`` its
    orthogonality error when it was checked.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        momentum: float = 0.0,
        iterations: int = 5,
        q: float = 0.5,
        eps: float = 1e-8,
        renormalize_rows: bool = True,
        qr_every: int = 0,
        orthogonality_tol: float | None = None,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if iterations < 1:
            raise ValueError(f"the Cayley update needs at least 1 iteration, got {iterations}")
        if not 0.0 < q <= 1.0:
            raise ValueError(f"q must be in (0, 1], got {q}")
        if qr_every < 0:
            raise ValueError(f"qr_every must be >= 0, got {qr_every}")
        if orthogonality_tol is not None and not orthogonality_tol > 0:
            raise ValueError(f"orthogonality_tol must be positive or None, got {orthogonality_tol}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            iterations=iterations,
            q=q,
            eps=eps,
            renormalize_rows=renormalize_rows,
            qr_every=qr_every,
            orthogonality_tol=orthogonality_tol,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2 or p.shape[0] > p.shape[1]:
                    raise ValueError(
                        f"CayleySGD needs 2-D parameters with at most as many rows as columns, got {tuple(p.shape)}"
                    )
        self.last_step_sizes: list[float] = []
        self.last_orthogonality: list[float] = []
        self.retractions = 0

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        step_sizes: list[torch.Tensor] = []
        checked: list[tuple[torch.Tensor, float]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] = int(state.get("step", 0)) + 1
                rows = p.detach()
                if group["renormalize_rows"]:
                    rows = rows / (rows.norm(dim=1, keepdim=True) + group["eps"])
                if group["qr_every"] and state["step"] % group["qr_every"] == 0:
                    rows = qr_retraction(rows)
                    self.retractions += 1
                beta = group["momentum"]
                buffer = state.get("momentum_buffer") if beta != 0.0 else None
                new_rows, new_momentum, step_size = cayley_step(
                    rows,
                    p.grad.detach().to(rows.dtype),
                    lr=group["lr"],
                    momentum_buffer=buffer,
                    momentum=beta,
                    iterations=group["iterations"],
                    q=group["q"],
                    eps=group["eps"],
                )
                p.copy_(new_rows)
                if beta != 0.0:
                    state["momentum_buffer"] = new_momentum
                step_sizes.append(step_size)
                if group["orthogonality_tol"] is not None:
                    checked.append((p, group["orthogonality_tol"]))
        self.last_step_sizes = torch.stack(step_sizes).tolist() if step_sizes else []
        self.last_orthogonality = []
        if checked:
            errors = torch.stack([orthogonality_error(p.detach()) for p, _ in checked]).tolist()
            self.last_orthogonality = errors
            for (p, tol), error in zip(checked, errors):
                if not math.isfinite(error) or error > tol:
                    if math.isfinite(error):
                        p.copy_(qr_retraction(p.detach()))
                        self.retractions += 1
        return loss
