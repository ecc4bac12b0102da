"""Cayley SGD (Li et al., ICLR 2020): hand-computed steps, the Cayley fixed point, orthogonality, momentum.

Tolerances: float64 checks against independent closed forms agree to ~1e-15 per operation; we allow 1e-12. float32
steps agree with float64 references to ~1e-6 (a few roundings of O(1) numbers); we allow 1e-5.
"""

from __future__ import annotations

import cmath
import math

import numpy as np
import pytest
import torch

from train_utils.cayley_sgd import CayleySGD, cayley_step, orthogonality_error, qr_retraction


def _param(matrix: torch.Tensor, grad: torch.Tensor) -> torch.nn.Parameter:
    p = torch.nn.Parameter(matrix.clone())
    p.grad = grad.clone()
    return p


def _random_orthogonal(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def test_step_on_a_2x2_rotation_matches_the_hand_computed_update():
    """R = I, G = S + K (S symmetric, K skew): the generator is W = K = [[0, -w], [w, 0]] with w = -0.3.

    In 2-D, W acts on a column as multiplication by i*w, so every column of the iterate is x * z with
    z_0 = 1 + i a w and z_{k+1} = 1 + (i a w / 2)(1 + z_k); ||W||_1 = 0.3, so the step is a = min(lr, 1/0.3) = lr.
    """
    lr, w = 1.0, -0.3
    grad = torch.tensor([[0.5, 0.2 + 0.3], [0.2 - 0.3, -0.1]], dtype=torch.float64)  # S + K, K = [[0, .3], [-.3, 0]]
    p = _param(torch.eye(2, dtype=torch.float64), grad)
    CayleySGD([p], lr=lr, renormalize_rows=False).step()

    z = 1 + 1j * lr * w
    for _ in range(5):
        z = 1 + (1j * lr * w / 2) * (1 + z)
    x_new = torch.tensor([[z.real, -z.imag], [z.imag, z.real]], dtype=torch.float64)  # columns e1*z, e2*z
    torch.testing.assert_close(p.detach(), x_new.T, rtol=0, atol=1e-12)

    # With many iterations it is the exact Cayley transform: a rotation by 2 atan(a w / 2).
    p = _param(torch.eye(2, dtype=torch.float64), grad)
    CayleySGD([p], lr=lr, iterations=80, renormalize_rows=False).step()
    angle = 2 * math.atan(lr * w / 2)
    c = cmath.exp(1j * angle)
    exact = torch.tensor([[c.real, -c.imag], [c.imag, c.real]], dtype=torch.float64).T
    torch.testing.assert_close(p.detach(), exact, rtol=0, atol=1e-12)


def test_adaptive_step_is_one_over_the_generator_one_norm():
    # Same problem, a large gradient: ||W||_1 = 3 > 1/lr, so a = 1/3 (min(lr, 1/||W||_1), q = 1/2).
    grad = torch.tensor([[0.0, 3.0], [-3.0, 0.0]], dtype=torch.float64)
    p = _param(torch.eye(2, dtype=torch.float64), grad)
    optimizer = CayleySGD([p], lr=1.5, renormalize_rows=False)
    optimizer.step()
    assert optimizer.last_step_sizes == pytest.approx([1 / 3], rel=1e-7)


def _numpy_cayley(r: np.ndarray, g: np.ndarray, lr: float, momentum_term: np.ndarray | None = None):
    """Algorithm 1 for square R, written independently with numpy: returns (exact Cayley R_new, W, X, a)."""
    x = r.T
    m = -g.T if momentum_term is None else momentum_term - g.T
    w_hat = m @ x.T - 0.5 * x @ (x.T @ m @ x.T)
    w = w_hat - w_hat.T
    a = min(lr, 1.0 / (np.abs(w).sum(axis=0).max() + 1e-8))
    n = x.shape[0]
    y = np.linalg.solve(np.eye(n) - a / 2 * w, (np.eye(n) + a / 2 * w) @ x)
    return y.T, w, x, a


def test_fixed_point_is_the_cayley_transform_and_five_iterations_meet_the_stated_bound():
    r = _random_orthogonal(6, seed=1)
    g = torch.randn(6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected, w, x, a = _numpy_cayley(r.numpy(), g.numpy(), lr=1.5)

    converged = _param(r, g)
    CayleySGD([converged], lr=1.5, iterations=100, renormalize_rows=False).step()
    np.testing.assert_allclose(converged.detach().numpy(), expected, rtol=0, atol=1e-12)

    five = _param(r, g)
    CayleySGD([five], lr=1.5, renormalize_rows=False).step()
    theta = a * np.linalg.norm(w, 2)  # a ||W||_2 <= a ||W||_1 <= 1
    bound = (theta / 2) ** 5 * theta**2 / 2
    assert theta <= 1 + 1e-12
    assert np.linalg.norm(five.detach().numpy() - expected, 2) <= bound + 1e-12


def test_momentum_uses_the_projected_buffer_and_matches_a_numpy_two_step_run():
    beta, lr = 0.9, 0.05
    r0 = _random_orthogonal(5, seed=3)
    grads = [torch.randn(5, 5, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in (4, 5)]
    p = _param(r0, grads[0])
    optimizer = CayleySGD([p], lr=lr, momentum=beta, iterations=100, renormalize_rows=False)
    optimizer.step()
    p.grad = grads[1].clone()
    optimizer.step()

    r1, w, x, _ = _numpy_cayley(r0.numpy(), grads[0].numpy(), lr)
    buffer = w @ x  # M <- W X: the momentum projected onto the tangent space
    r2, _, _, _ = _numpy_cayley(r1, grads[1].numpy(), lr, momentum_term=beta * buffer)
    np.testing.assert_allclose(p.detach().numpy(), r2, rtol=0, atol=1e-12)
    assert np.abs(x.T @ buffer + (x.T @ buffer).T).max() < 1e-12  # X^T M is skew: M is tangent at X
    stored = r1 @ optimizer.state[p]["momentum_buffer"].numpy()  # X^T M at the point the second step started from
    assert np.abs(stored + stored.T).max() < 1e-12


def test_float32_orthogonality_over_many_steps():
    """Bound: each step adds at most (theta/2)^5 theta^2 (the unconverged Cayley iteration) plus float32 rounding
    (~ n * 6e-8 = 4e-6 for n = 64); over 300 steps at lr 1.5 that is < 2e-3 without any QR. With the QR guard at
    1e-4 every step must end at or below 1e-4."""
    n, steps = 64, 300
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    for tol, bound in ((None, 2e-3), (1e-4, 1e-4)):
        r = torch.nn.Parameter(_random_orthogonal(n, seed=7, dtype=torch.float32))
        optimizer = CayleySGD([r], lr=1.5, orthogonality_tol=tol)
        worst = 0.0
        for _ in range(steps):
            optimizer.zero_grad()
            (((a @ r - b) ** 2).sum() + (r**4).sum()).backward()
            optimizer.step()
            worst = max(worst, orthogonality_error(r.detach()).item())
        assert r.dtype == torch.float32
        assert worst <= bound, (tol, worst)


def test_procrustes_loss_goes_down_to_the_target_rotation():
    target = _random_orthogonal(8, seed=11, dtype=torch.float32)
    r = torch.nn.Parameter(torch.eye(8))
    optimizer = CayleySGD([r], lr=0.5)
    losses = []
    for _ in range(200):
        optimizer.zero_grad()
        loss = ((r - target) ** 2).sum()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    if torch.det(target) > 0:  # reachable from I by rotations
        assert losses[-1] < 1e-3 * losses[0]
    assert losses[-1] < losses[0]


def test_qr_every_and_the_orthogonality_guard_retract():
    r = torch.nn.Parameter(_random_orthogonal(4, seed=5, dtype=torch.float32))
    optimizer = CayleySGD([r], lr=0.1, qr_every=2)
    for _ in range(4):
        r.grad = torch.randn(4, 4)
        optimizer.step()
    assert optimizer.retractions == 2

    # A matrix pushed off the manifold is pulled back by the guard.
    r = torch.nn.Parameter(_random_orthogonal(4, seed=6, dtype=torch.float32))
    optimizer = CayleySGD([r], lr=0.1, orthogonality_tol=1e-5, renormalize_rows=False)
    with torch.no_grad():
        r.add_(1e-2 * torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
    r.grad = torch.zeros(4, 4)
    optimizer.step()
    assert optimizer.retractions == 1
    assert orthogonality_error(r.detach()).item() < 1e-5


def test_qr_retraction_returns_orthonormal_rows_and_keeps_a_rotation():
    r = _random_orthogonal(5, seed=8)
    torch.testing.assert_close(qr_retraction(r), r, rtol=0, atol=1e-12)
    noisy = r + 1e-3 * torch.randn(5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert orthogonality_error(qr_retraction(noisy)).item() < 1e-12


def test_state_dict_round_trip_continues_identically():
    r0 = _random_orthogonal(6, seed=9, dtype=torch.float32)
    grads = [torch.randn(6, 6, generator=torch.Generator().manual_seed(s)) for s in range(4)]

    def run(split: bool) -> torch.Tensor:
        r = torch.nn.Parameter(r0.clone())
        optimizer = CayleySGD([r], lr=0.1, momentum=0.5)
        for i, g in enumerate(grads):
            if split and i == 2:
                state = optimizer.state_dict()
                r = torch.nn.Parameter(r.detach().clone())
                optimizer = CayleySGD([r], lr=0.1, momentum=0.5)
                optimizer.load_state_dict(state)
            r.grad = g.clone()
            optimizer.step()
        return r.detach()

    torch.testing.assert_close(run(False), run(True), rtol=0, atol=0)


def test_parameters_without_a_gradient_are_left_alone():
    r = torch.nn.Parameter(torch.eye(3))
    CayleySGD([r], lr=1.0).step()
    assert torch.equal(r.detach(), torch.eye(3))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=0.0), "learning rate"),
        (dict(lr=1.0, momentum=1.0), "momentum"),
        (dict(lr=1.0, iterations=0), "iteration"),
        (dict(lr=1.0, orthogonality_tol=0.0), "orthogonality_tol"),
    ],
)
def test_bad_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CayleySGD([torch.nn.Parameter(torch.eye(2))], **kwargs)


@pytest.mark.parametrize("shape", [(3,), (4, 2), (2, 2, 2)])
def test_non_stiefel_shapes_are_rejected(shape):
    with pytest.raises(ValueError, match="2-D parameters"):
        CayleySGD([torch.nn.Parameter(torch.zeros(shape))], lr=1.0)


def test_cayley_step_on_a_wide_stiefel_matrix_keeps_orthonormal_rows():
    # p < n (not used by SpinQuant, but the algorithm is general): rows stay orthonormal in float64.
    q, _ = torch.linalg.qr(torch.randn(7, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    rows = q.T
    grad = torch.randn(3, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    new_rows, _, _ = cayley_step(rows, grad, lr=0.3, iterations=100)
    assert orthogonality_error(new_rows).item() < 1e-12
