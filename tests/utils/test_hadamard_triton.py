"""Tests for utils/hadamard_triton.py (the "triton" backend of utils.hadamard), its dispatch, and the fused
Hadamard + activation quantization (utils.hadamard.hadamard_quantize) as the model uses it.

Three sets:

* dispatch (always run, Triton or not): the auto order fast_hadamard_transform > Triton on CUDA > PyTorch, the
  environment variable, and a subprocess in which ``import triton`` fails, so a CI without Triton is covered;
* interpreter (``test_interpreter_*``, CPU, small sizes): the real kernel code run by Triton's CPU interpreter.
  The interpreter must be switched on before anything imports Triton (transformers does, at import), so these run
  in a fresh process started with ``TRITON_INTERPRET=1`` by ``test_interpreter_set_in_a_fresh_process`` (or
  directly: ``TRITON_INTERPRET=1 pytest tests/utils/test_hadamard_triton.py``); skipped without Triton and on a
  CUDA machine, where the GPU set runs the same checks compiled;
* GPU (``test_gpu_*``, skipped without CUDA): the full grid of sizes up to 2^15 and real model sizes, for the H100
  run (``pytest tests/utils/test_hadamard_triton.py -k gpu``).

Tolerances (the reason for each is next to the helper that applies it):

* power-of-two sizes on the butterfly path (float32, and 16-bit rows outside 16..512): the kernel runs the
  PyTorch backend's butterfly stages in the same order in float32, so its output is bit-identical to the PyTorch
  backend (transform and fused quantization alike);
* 16-bit rows of 16..512 (the tensor-core path) and sizes with an m x m factor: exact +-1 products summed by a dot,
  so the float32 sums differ from the PyTorch backend's order; the transform agrees to float32 rounding (a few
  ulps), 16-bit outputs to one ulp of their dtype; a quantized value lying on a rounding boundary can then move by
  one quantization step (tested: at most one step, on at most 0.1% of the elements; everything else equal);
* the fused quantizer itself is exact everywhere: the fused kernel equals ``fake_quantize`` of the same kernel's
  transform bit for bit (it follows PyTorch's rounding of ``span / maxq`` on the tensor's device, see
  ``test_interpreter_fused_quantizer_follows_cuda_division_rule``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils import hadamard
from utils.hadamard import hadamard_matrix, hadamard_quantize, hadamard_transform
from utils.quant import QuantSpec, fake_quantize

REPO_ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
INTERPRETER_PROCESS = os.environ.get("TRITON_INTERPRET", "") == "1"  # set when this process started
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Relative rounding of each dtype (half an ulp): the tolerance of a result that is correctly rounded once.
HALF_ULP = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Specs of the paper's activation/K quantizers: asym per token with clip ratio, sym, groups (e.g. per head).
SPECS = (
    QuantSpec(bits=4, asym=True, groupsize=-1, clip_ratio=0.9),
    QuantSpec(bits=4, asym=False, groupsize=-1, clip_ratio=1.0),
    QuantSpec(bits=8, asym=True, groupsize=16, clip_ratio=1.0),
    QuantSpec(bits=3, asym=False, groupsize=32, clip_ratio=0.95),
)


# ------------------------------------------------------------------------------------------------ references


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, device="cpu", seed: int = 0) -> torch.Tensor:
    """Normal values with a few outlier rows and an all-zero row (the quantizer's [-1, 1] special case)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float32)
    flat = x.view(-1, shape[-1])
    flat[0] = 0
    if flat.shape[0] > 2:
        flat[1, :3] *= 40  # an outlier token
        flat[2] = flat[2].abs()  # all >= 0: asymmetric range touching zero
    return x.to(dtype=dtype, device=device)


def _is_power_of_two(n: int) -> bool:
    return n & (n - 1) == 0


def _bit_identical_to_torch(n: int) -> bool:
    """Whether the Triton transform's default launch runs the PyTorch backend's butterflies in order (powers of two:
    the default launch is the butterfly path for every dtype): then its output equals the PyTorch backend's bit for
    bit."""
    return _is_power_of_two(n)


def _dense_reference(x: torch.Tensor) -> torch.Tensor:
    """x @ H in float64 with the dense matrix of the Hadamard module (the definition the kernel must reproduce)."""
    n = x.shape[-1]
    return x.double() @ hadamard_matrix(n, torch.float64, device=x.device)


def assert_transform_close(y: torch.Tensor, reference: torch.Tensor) -> None:
    """y is x @ H computed in float32 and rounded once to y's dtype: |y - ref| <= half an ulp of y's dtype relative
    (plus float32 accumulation: 1e-6 relative to the row scale, log2(n) <= 15 stages of ~6e-8 each). For 16-bit
    rows of n = m * p with a small factor (m <= 32), the factor-last form multiplies the float32 intermediate split
    into two bfloat16 parts (16 significant bits, each |t - hi - mid| <= 2^-18 |t|): up to m * 2^-18 of the row
    scale more (m = 12: 4.6e-5, under a tenth of a float16 half-ulp at the row scale)."""
    scale = reference.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    error = (y.double() - reference).abs()
    m = hadamard._plan(y.shape[-1]).m
    split = m * 2.0**-18 if y.dtype in (torch.bfloat16, torch.float16) and 1 < m <= 32 else 0.0
    bound = HALF_ULP[y.dtype] * reference.abs() * 1.0001 + (1e-6 + split) * scale
    worst = (error - bound).max().item()
    assert worst <= 0, f"transform off by more than its rounding: worst excess {worst:.3g}"


def _group_steps(z: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantization step (scale) of each element's group, from the transformed values z (float)."""
    n = z.shape[-1]
    group = n if spec.groupsize <= 0 else spec.groupsize
    zg = z.double().reshape(*z.shape[:-1], n // group, group)
    lo = zg.amin(-1, keepdim=True).clamp(max=0) * spec.clip_ratio
    hi = zg.amax(-1, keepdim=True).clamp(min=0) * spec.clip_ratio
    span = (hi - lo) if spec.asym else torch.maximum(-lo, hi)
    step = span / spec.maxq
    step = torch.where(step == 0, torch.ones_like(step), step)
    return step.expand_as(zg).reshape(z.shape)


def assert_quantized_close(y: torch.Tensor, reference: torch.Tensor, z: torch.Tensor, spec: QuantSpec) -> None:
    """Fused vs unfused quantization when their transforms differ by float32 rounding (non-power-of-two n).

    A value sitting on a rounding boundary (or a group extreme setting the scale) can flip one level: allowed on
    at most 0.1% of the elements, by at most one step. All others agree up to the output dtype's rounding and the
    scale's own float32 difference: the group's extreme differs by the transform's rounding (up to ~log2(n) + m
    float32 ulps, 1e-6 relative measured), so 4e-6 relative (16-bit outputs: their half ulp dominates).
    """
    steps = _group_steps(z, spec)
    diff = (y.double() - reference.double()).abs()
    tiny = (4 * HALF_ULP[y.dtype] + 4e-6) * reference.double().abs() + 1e-6 * steps
    flipped = diff > tiny
    assert flipped.float().mean().item() <= 1e-3, f"{flipped.float().mean().item():.2e} of the values moved"
    assert bool((diff <= steps * (1 + 1e-3) + tiny).all()), "a value moved by more than one quantization step"


def _composition(x: torch.Tensor, spec: QuantSpec, fp32: bool = False) -> torch.Tensor:
    """The unfused PyTorch reference, exactly what the model computed before the fused kernels."""
    if fp32 and x.dtype != torch.float32:
        return fake_quantize(hadamard_transform(x.float(), backend="torch"), spec).to(x.dtype)
    return fake_quantize(hadamard_transform(x, backend="torch"), spec)


def _quantized_kernel_transform(x: torch.Tensor, spec: QuantSpec, fp32: bool = False) -> torch.Tensor:
    """fake_quantize of the Triton transform: what the fused kernel must equal bit for bit whatever the path."""
    if fp32 and x.dtype != torch.float32:
        return fake_quantize(hadamard_transform(x.float(), backend="triton"), spec).to(x.dtype)
    return fake_quantize(hadamard_transform(x, backend="triton"), spec)


def _transformed_for_steps(x: torch.Tensor, fp32: bool) -> torch.Tensor:
    z = hadamard_transform(x.float() if fp32 else x, backend="torch")
    return z.float()


# ------------------------------------------------------------------------------------------------ dispatch


@pytest.fixture
def fake_backends(monkeypatch):
    """Every CUDA-only backend made available and willing, each transform recording its name: the auto order is
    then visible on a CPU machine without Triton or fast_hadamard_transform."""
    calls: list[str] = []
    replaced = {}
    for name, backend in hadamard._BACKENDS.items():

        def transform(x, _name=name):
            calls.append(_name)
            return hadamard._torch_backend(x)

        replaced[name] = hadamard._Backend(transform, lambda: True, lambda x: True, backend.auto_priority, "")
    monkeypatch.setattr(hadamard, "_BACKENDS", replaced)
    monkeypatch.delenv(hadamard.BACKEND_ENV_VAR, raising=False)
    return replaced, calls


def test_auto_order_is_fast_hadamard_transform_then_triton_then_torch(fake_backends):
    backends, calls = fake_backends
    x = torch.randn(2, 64)
    hadamard_transform(x)
    backends.pop("fast_hadamard_transform")
    hadamard_transform(x)
    backends.pop("triton")
    hadamard_transform(x)
    assert calls == ["fast_hadamard_transform", "triton", "torch"]


def test_triton_backend_is_registered_for_auto_between_the_others():
    priority = {name: backend.auto_priority for name, backend in hadamard._BACKENDS.items()}
    assert priority["fast_hadamard_transform"] > priority["triton"] > priority["torch"]
    assert hadamard._BACKENDS["triton"].quantize is not None  # the fused kernel is what hadamard_quantize uses


def test_auto_never_picks_the_interpreter_for_cpu_tensors(monkeypatch):
    # Even with the interpreter switched on, "auto" keeps CPU tensors on PyTorch (the interpreter is for tests).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(hadamard.BACKEND_ENV_VAR, raising=False)
    x = torch.randn(3, 64)
    assert hadamard._select_backend(x, None) is hadamard._BACKENDS["torch"]


def test_without_triton_everything_falls_back_cleanly():
    """The CPU suite must pass where Triton is not installed (CI): block `import triton` in a fresh process and
    use every public entry point, including the fused one and a forced triton backend (clear ImportError)."""
    code = """
import sys, torch
sys.modules["triton"] = None  # import triton now raises ImportError, find_spec returns None
from utils import hadamard
from utils.quant import QuantSpec, fake_quantize
assert "triton" not in hadamard.available_backends()
x = torch.randn(4, 1536)
y = hadamard.hadamard_quantize(x, QuantSpec(4, True))
assert torch.equal(y, fake_quantize(hadamard.hadamard_transform(x), QuantSpec(4, True)))
try:
    hadamard.hadamard_transform(x, backend="triton")
except ImportError as err:
    assert "Triton" in str(err)
    print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_hadamard_quantize_without_quantization_is_the_transform():
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    spec = QuantSpec(bits=16)
    assert torch.equal(hadamard_quantize(x, spec), hadamard_transform(x))
    assert torch.equal(hadamard_quantize(x, spec, fp32=True), hadamard_transform(x))


@pytest.mark.parametrize("fp32", [False, True])
def test_hadamard_quantize_on_pytorch_is_the_composition(fp32):
    x = torch.randn(2, 3, 192, dtype=torch.bfloat16)
    spec = QuantSpec(bits=4, asym=True, clip_ratio=0.9)
    assert torch.equal(hadamard_quantize(x, spec, fp32=fp32, backend="torch"), _composition(x, spec, fp32))


def test_hadamard_quantize_gradient_is_the_hadamard_gradient():
    # Straight-through quantizer: d/dx sum(Q(x H) * g) = g H^T; float64 rounding only: 1e-12.
    x = torch.randn(3, 192, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 192, dtype=torch.float64)
    (hadamard_quantize(x, QuantSpec(bits=4, asym=True)) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ hadamard_matrix(192, torch.float64).T, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------ interpreter


@pytest.fixture(scope="module")
def interpreted():
    """utils.hadamard_triton as run by Triton's CPU interpreter (this process started with TRITON_INTERPRET=1)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if HAS_CUDA:
        pytest.skip("CUDA present: the compiled kernels are tested by the test_gpu_* set instead")
    if not INTERPRETER_PROCESS:
        pytest.skip("needs TRITON_INTERPRET=1 from the start: run by test_interpreter_set_in_a_fresh_process")
    module = hadamard._triton_module()
    assert module is not None and module._interpreting(), "Triton was imported before TRITON_INTERPRET took effect"
    patch = pytest.MonkeyPatch()
    patch.delenv(hadamard.BACKEND_ENV_VAR, raising=False)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors; avoids oversubscribing the shared CPU
    yield module
    torch.set_num_threads(previous_threads)
    patch.undo()


@pytest.mark.skipif(not HAS_TRITON or HAS_CUDA or INTERPRETER_PROCESS, reason="needs Triton, no CUDA, not nested")
def test_interpreter_set_in_a_fresh_process():
    """Run every test_interpreter_* test in a process that has the interpreter on before anything imports Triton;
    all of them must run (none skipped) and pass."""
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
        "-k", "test_interpreter_ and not fresh_process",
    ]  # fmt: skip
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop(hadamard.BACKEND_ENV_VAR, None)
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=1500)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, summary


# Small sizes the interpreter runs in well under a second: powers of two and each kind of m x m factor.
INTERPRETER_SIZES = (2, 16, 64, 256, 12 * 16, 20 * 16, 28 * 32, 172 * 16)


@pytest.mark.parametrize("n", INTERPRETER_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interpreter_transform_matches_dense_reference(interpreted, n, dtype):
    x = _inputs((3, 5, n), dtype)
    y = hadamard_transform(x, backend="triton")
    assert y.dtype == dtype and y.shape == x.shape
    assert_transform_close(y, _dense_reference(x))
    if _bit_identical_to_torch(n):
        assert torch.equal(y, hadamard_transform(x, backend="torch"))  # same stages, same order: bit-identical


@pytest.mark.parametrize("n", (64, 12 * 16, 28 * 32))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_interpreter_gradient_is_g_times_h_transpose(interpreted, n, dtype):
    # The m x m factor is not symmetric: the backward must use H_m where the forward uses H_m^T.
    x = _inputs((4, n), dtype).requires_grad_(True)
    g = _inputs((4, n), dtype, seed=1)
    hadamard_transform(x, backend="triton").backward(g)
    assert x.grad.dtype == dtype
    assert_transform_close(x.grad, g.double() @ hadamard_matrix(n, torch.float64).T)


def test_interpreter_double_backward(interpreted):
    # The backward is itself the (transposed) kernel with autograd, so second derivatives work: d/dg of
    # <grad_x(g), v> = v @ H.
    x = torch.randn(2, 28 * 16, requires_grad=True)
    g = torch.randn(2, 28 * 16, requires_grad=True)
    (grad_x,) = torch.autograd.grad(hadamard_transform(x, backend="triton"), x, g, create_graph=True)
    v = torch.randn_like(grad_x)
    (grad_g,) = torch.autograd.grad(grad_x, g, v)
    expected = v.double() @ hadamard_matrix(28 * 16, torch.float64)
    torch.testing.assert_close(grad_g.double(), expected, rtol=1e-5, atol=1e-5)  # float32 rounding


def _spec_id(spec: QuantSpec) -> str:
    return f"b{spec.bits}{'a' if spec.asym else 's'}g{spec.groupsize}c{spec.clip_ratio}"


FUSED_CASES = [
    *[(n, dtype, spec, False) for n in (64, 12 * 16) for dtype in DTYPES for spec in SPECS],
    *[(n, dtype, spec, True) for n in (64, 12 * 16) for dtype in DTYPES[1:] for spec in SPECS[:2]],
    (172 * 16, torch.bfloat16, SPECS[0], False),  # the largest factor, with the dot in K chunks (slow here)
    (172 * 16, torch.float32, SPECS[2], False),
]


@pytest.mark.parametrize(
    ("n", "dtype", "spec", "fp32"),
    FUSED_CASES,
    ids=[f"{n}-{str(d)[6:]}-{_spec_id(s)}{'-fp32_had' if f else ''}" for n, d, s, f in FUSED_CASES],
)
def test_interpreter_fused_quantize_matches_composition(interpreted, n, dtype, spec, fp32):
    x = _inputs((3, 4, n), dtype)
    fused = hadamard_quantize(x, spec, fp32=fp32, backend="triton")
    reference = _composition(x, spec, fp32)
    assert fused.dtype == dtype
    if _bit_identical_to_torch(n):
        assert torch.equal(fused, reference)
    else:
        assert_quantized_close(fused, reference, _transformed_for_steps(x, fp32), spec)
    # The quantizer alone is exact: the same kernel's transform, quantized by PyTorch, is the fused result.
    assert torch.equal(fused, _quantized_kernel_transform(x, spec, fp32))


def test_interpreter_fused_quantize_really_runs_the_fused_kernel(interpreted, monkeypatch):
    calls = []
    original = interpreted.hadamard_quantize
    monkeypatch.setattr(interpreted, "hadamard_quantize", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = _inputs((4, 64), torch.bfloat16)
    hadamard_quantize(x, QuantSpec(4, True), backend="triton")  # supported: fused
    hadamard_quantize(_inputs((4, 12 * 16), torch.bfloat16), QuantSpec(4, True, groupsize=64), backend="triton")
    assert calls == [1]  # groups of 64 straddle the 12 blocks of 16 columns: composition instead


def test_interpreter_unfusable_group_falls_back_to_composition(interpreted):
    x = _inputs((4, 12 * 16), torch.float32)
    spec = QuantSpec(bits=4, asym=True, groupsize=64)  # divides n = 192 but not the power-of-two part 16
    y = hadamard_quantize(x, spec, backend="triton")
    z = hadamard_transform(x, backend="triton")
    assert torch.equal(y, fake_quantize(z, spec))


def test_interpreter_fused_gradient_is_straight_through(interpreted):
    x = _inputs((3, 12 * 16), torch.float32).requires_grad_(True)
    g = _inputs((3, 12 * 16), torch.float32, seed=2)
    hadamard_quantize(x, QuantSpec(bits=4, asym=True), backend="triton").backward(g)
    assert_transform_close(x.grad, g.double() @ hadamard_matrix(12 * 16, torch.float64).T)


def _strided_cases():
    base = _inputs((2, 7, 3, 64), torch.bfloat16)
    wide = _inputs((5, 128), torch.bfloat16)
    deep = _inputs((2, 2, 2, 2, 2, 64), torch.bfloat16)
    return {
        "heads_transposed": base.transpose(1, 2),  # [batch, heads, seq, head_dim] view of [batch, seq, heads, d]
        "column_step": wide[:, ::2],  # last-dimension stride 2
        "row_slice": _inputs((9, 64), torch.bfloat16)[1::3],
        "deep_permuted": deep.permute(4, 0, 2, 1, 3, 5),  # five leading levels that cannot merge: copied
        "one_row": _inputs((64,), torch.bfloat16),
        "empty": torch.empty(0, 3, 64, dtype=torch.bfloat16),
    }


@pytest.mark.parametrize("case", list(_strided_cases()))
def test_interpreter_any_leading_shape_and_strides(interpreted, case):
    x = _strided_cases()[case]
    y = hadamard_transform(x, backend="triton")
    assert y.shape == x.shape
    assert torch.equal(y, hadamard_transform(x.contiguous(), backend="triton"))  # strides change nothing
    for spec in (QuantSpec(bits=4, asym=True, groupsize=x.shape[-1] // 2), SPECS[1]):
        fused = hadamard_quantize(x, spec, backend="triton")
        assert torch.equal(fused, fake_quantize(y, spec))
        if x.numel():
            assert_quantized_close(fused, _composition(x, spec), _transformed_for_steps(x, False), spec)
    if x.numel():
        assert_transform_close(y, _dense_reference(x))


def test_interpreter_forced_backend_rejects_what_it_cannot_do(interpreted, monkeypatch):
    monkeypatch.setenv(hadamard.BACKEND_ENV_VAR, "triton")
    with pytest.raises(ValueError, match="triton.*2\\^k"):
        hadamard_transform(torch.randn(2, 12 * 8))  # m > 1 needs a power-of-two part >= 16
    with pytest.raises(ValueError, match="triton"):
        hadamard_transform(torch.randn(2, 64, dtype=torch.float64))


def test_interpreter_launch_config_is_sane(interpreted):
    for n in (2, 16, 64, 256, 512, 1024, 1536, 4096, 8192, 11008, 14336, 32768):
        for rows in (1, 1000, 2**16):
            for dtype in (torch.bfloat16, torch.float32):
                per_program, warps, radix, dot = interpreted.launch_config(n, rows, dtype)
                assert per_program >= 1 and _is_power_of_two(per_program)
                assert warps in (1, 2, 4, 8, 16) and radix >= 1
                assert dot == interpreted._factor_last_default(n)  # butterflies by default; m = 12: factor last
                candidates = interpreted.candidate_configs(n, rows, dtype)
                assert candidates[0] == (per_program, warps, radix, dot) and len(set(candidates)) == len(candidates)
                assert len(candidates) >= 2
                # Sizes the tensor-core path can run offer both paths to the autotuner, the default one first.
                # Likewise both orders (factor first / last) for m * p sizes with a small factor.
                capable = interpreted._dot_capable(n, dtype) or interpreted._factor_last_capable(n)
                assert {config.dot for config in candidates} == ({True, False} if capable else {False})
                for config in candidates:
                    if config.dot and interpreted._plan(n).m > 1:
                        assert config.rows == 1 and interpreted._plan(n).m <= 32
                    elif config.dot:  # tensor-core path: tl.dot needs >= 16 rows, a valid dot size / split
                        assert dtype == torch.bfloat16 and 16 <= n <= interpreted.DOT_MAX
                        assert config.rows >= 16 and config.num_warps in (4, 8)
                        assert config.radix in interpreted._dot_options(n)
                if dot and interpreted._plan(n).m == 1:
                    if rows >= 2**16:  # many rows: big tiles, yet >= ~4 programs per SM of an H100
                        assert rows // per_program >= 512 and per_program * n >= min(4096, 64 * n)
                elif n <= 2048 and _is_power_of_two(n) and rows >= 2**16:  # small rows: several per program
                    assert per_program * n >= 2048 or rows // per_program >= 512
                    assert per_program > 1 or n >= 2048
    # The tensor-core path is never the default (the butterflies measured faster on an H200) but an autotuner
    # candidate wherever it can run: 16-bit rows of 16..512.
    assert interpreted._dot_capable(64, torch.float16) and not interpreted._dot_capable(64, torch.float32)
    assert not interpreted._dot_capable(8, torch.bfloat16) and not interpreted._dot_capable(1024, torch.bfloat16)
    assert not interpreted._dot_capable(12 * 16, torch.bfloat16)
    assert any(config.dot for config in interpreted.candidate_configs(256, 2**16, torch.bfloat16))
    assert not interpreted.launch_config(256, 2**16, torch.bfloat16).dot
    assert interpreted.launch_config(256, 2**16, torch.bfloat16, dot=True).dot
    assert interpreted.candidate_configs(512, 2**16, torch.bfloat16, group=256)  # chunked dots excluded, others kept
    assert all(not (config.dot and config.radix >= 6)
               for config in interpreted.candidate_configs(512, 2**16, torch.bfloat16, group=256))


def test_interpreter_launch_host_work_is_memoized(interpreted):
    # The launch path keeps one prepared entry per (n, dtype, device, variant, config or rows bucket): repeated
    # calls, other row counts of the same power-of-two bucket and other leading shapes reuse it, and a fused
    # quantizer or another bucket gets its own.
    interpreted._PREPARED.clear()
    x = _inputs((40, 64), torch.bfloat16)
    y = interpreted.launch(x)
    assert len(interpreted._PREPARED) == 1
    assert torch.equal(interpreted.launch(x), y) and torch.equal(interpreted.launch(x[:33]), y[:33])
    assert torch.equal(interpreted.launch(x.view(5, 8, 64)), y.view(5, 8, 64))
    assert len(interpreted._PREPARED) == 1
    interpreted.launch(x, spec=SPECS[0])
    interpreted.launch(x[:3])
    assert len(interpreted._PREPARED) == 3
    assert interpreted.supports(x) and interpreted.supports_quantize(x, SPECS[0])  # memoized answers, same values
    assert interpreted.supports(x) and not interpreted.supports(x.double())


def test_interpreter_tuned_layouts_persist_per_gpu(interpreted, monkeypatch, tmp_path):
    key = "H100|triton x|v1|64|bfloat16|t|rows2"
    monkeypatch.setattr(interpreted, "_TUNED", {key: interpreted.LaunchConfig(32, 4, 5, True)})
    monkeypatch.setattr(interpreted, "_tuning_file", lambda: tmp_path / "tuned.json")
    interpreted._save_tuned()
    interpreted._TUNED.clear()
    monkeypatch.setattr(interpreted, "_DISK_LOADED", set())
    interpreted._load_tuned("A100|triton x|v1")  # another GPU: nothing loaded
    assert interpreted.tuned_configs() == {}
    interpreted._load_tuned("H100|triton x|v1")
    assert interpreted.tuned_configs() == {key: [32, 4, 5, True]}


@pytest.mark.parametrize(("n", "dtype"), [(64, torch.float32), (512, torch.float32), (12 * 16, torch.bfloat16)])
def test_interpreter_every_butterfly_launch_config_computes_the_same(interpreted, n, dtype):
    # Rows per program, warps and the butterfly grouping only change the data layout, never the additions or
    # their order: bit-identical results (transform and fused quantization) for every configuration.
    x = _inputs((37, n), dtype)
    spec = SPECS[0]
    expected = interpreted.launch(x, config=interpreted.launch_config(n, 37, dtype))
    expected_q = interpreted.launch(x, spec=spec, config=interpreted.launch_config(n, 37, dtype))
    for rows in (1, 2, 8):
        for radix in (1, 2, 3, 5):
            config = (rows, 2, radix)
            assert torch.equal(interpreted.launch(x, config=config), expected), config
            assert torch.equal(interpreted.launch(x, spec=spec, config=config), expected_q), config


@pytest.mark.parametrize("n", (64, 256, 512))
def test_interpreter_every_dot_launch_config_is_correct(interpreted, n):
    # On the tensor-core path a config may change the float32 summation order (the dot size / split), so each is
    # checked against the float64 reference, and its fused variant against quantizing its own transform.
    x = _inputs((37, n), torch.bfloat16)
    reference = _dense_reference(x)
    configs = [config for config in interpreted.candidate_configs(n, 37, torch.bfloat16) if config.dot]
    # 64: one dense dot; 256: chunks of 128 or 64, or 16 x 16; 512: 32 x 16, 16 x 32, or chunks of 128
    assert len({config.radix for config in configs}) == {64: 1, 256: 3, 512: 3}[n]
    for config in configs:
        y = interpreted.launch(x, config=config)
        assert_transform_close(y, reference)
        assert torch.equal(interpreted.launch(x, spec=SPECS[0], config=config), fake_quantize(y, SPECS[0])), config
    with pytest.raises(ValueError, match="dot-path launch config"):
        interpreted.launch(x, config=(8, 4, interpreted._dot_options(n)[0], True))  # tl.dot needs >= 16 rows


FACTOR_LAST_SIZES = (12 * 16, 20 * 32, 28 * 16)


@pytest.mark.parametrize("n", FACTOR_LAST_SIZES)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_interpreter_factor_last_matches_dense_reference(interpreted, n, dtype):
    # n = m * p with m <= 32: the butterflies first, the factor last as a split dot on the float32 intermediate
    # (exact products, so only the float32 summation order differs from the factor-first form).
    x = _inputs((3, 5, n), dtype)
    reference = _dense_reference(x)
    first = interpreted.launch_config(n, 15, dtype, dot=False)
    last = interpreted.launch_config(n, 15, dtype, dot=True)
    assert last == first._replace(dot=True) and last in interpreted.candidate_configs(n, 15, dtype)
    _, _, meta = interpreted.kernel_arguments(x, torch.empty_like(x), config=last)
    assert meta["FACTOR_LAST"] and meta["M"] > 1  # really the factor-last form
    y = interpreted.launch(x, config=last)
    assert y.dtype == dtype
    assert_transform_close(y, reference)
    assert_transform_close(interpreted.launch(x, config=first), reference)
    strided = _inputs((5, 3, 2 * n), dtype)[..., ::2]
    assert torch.equal(interpreted.launch(strided, config=last), interpreted.launch(strided.contiguous(), config=last))
    for spec in SPECS[:2]:
        assert torch.equal(interpreted.launch(x, spec=spec, config=last), fake_quantize(y, spec))
    g = _inputs((15, n), dtype, seed=1)  # backward: the transposed factor, in the same form
    back = interpreted.launch(g, transpose=True, config=last)
    assert_transform_close(back, g.double() @ hadamard_matrix(n, torch.float64).T)


def test_interpreter_factor_last_needs_a_small_factor(interpreted):
    x = _inputs((2, 172 * 16), torch.float32)
    assert not interpreted._factor_last_capable(172 * 16) and not interpreted._factor_last_capable(12 * 8)
    assert not interpreted.launch_config(172 * 16, 2, torch.float32, dot=True).dot  # not offered
    with pytest.raises(ValueError, match="factor-last launch config"):
        interpreted.launch(x, config=(1, 4, 5, True))


# The tensor-core path: every power of two it covers, both 16-bit dtypes, a row count that leaves a partial tile.
DOT_SIZES = (16, 32, 64, 128, 256, 512)


@pytest.mark.parametrize("n", DOT_SIZES)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_interpreter_dot_path_matches_dense_reference(interpreted, n, dtype):
    x = _inputs((3, 13, n), dtype)  # 39 rows: two full tiles of 16 and a masked partial one
    reference = _dense_reference(x)
    y = hadamard_transform(x, backend="triton")  # the default path for the size
    assert y.dtype == dtype and y.shape == x.shape
    assert_transform_close(y, reference)
    assert_transform_close(y, hadamard_transform(x.double(), backend="torch"))
    for radix in interpreted._dot_options(n):  # every tensor-core form: dense, chunked, two-level
        config = interpreted.launch_config(n, 39, dtype, dot=True)._replace(radix=radix)
        _, _, meta = interpreted.kernel_arguments(x, torch.empty_like(x), config=config)
        assert meta["DOT"] > 0 and meta["ROWS"] >= 16  # really the tensor-core path
        assert_transform_close(interpreted.launch(x, config=config), reference)


@pytest.mark.parametrize("n", (64, 512))
def test_interpreter_dot_path_non_contiguous_inputs(interpreted, n):
    base = _inputs((5, 3, 2 * n), torch.bfloat16)
    for x in (base[..., ::2], base.transpose(0, 1)[..., :n], base[1:4, :, n:]):
        y = hadamard_transform(x, backend="triton")
        assert_transform_close(y, _dense_reference(x))
        assert torch.equal(y, hadamard_transform(x.contiguous(), backend="triton"))


@pytest.mark.parametrize("n", (32, 256, 512))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_interpreter_dot_path_gradients(interpreted, n, dtype):
    x = _inputs((17, n), dtype).requires_grad_(True)
    g = _inputs((17, n), dtype, seed=1)
    hadamard_transform(x, backend="triton").backward(g)
    assert x.grad.dtype == dtype
    assert_transform_close(x.grad, g.double() @ hadamard_matrix(n, torch.float64).T)
    x.grad = None
    hadamard_quantize(x, SPECS[0], backend="triton").backward(g)  # straight-through: the same gradient
    assert_transform_close(x.grad, g.double() @ hadamard_matrix(n, torch.float64).T)


@pytest.mark.parametrize("n", (64, 128))
@pytest.mark.parametrize("groupsize", (-1, 32))
def test_interpreter_fused_symmetric_4bit_is_bit_identical(interpreted, n, groupsize):
    """Regression (H100: 0.15-0.3% of the values one step off): symmetric 4-bit bfloat16, per row and in groups,
    contiguous and strided: the fused kernel equals fake_quantize of the transform bit for bit."""
    spec = QuantSpec(bits=4, asym=False, groupsize=groupsize)
    x = _inputs((4, 33, n), torch.bfloat16)
    for view in (x, _inputs((4, 33, 2 * n), torch.bfloat16)[..., ::2], x.transpose(0, 1)):
        fused = hadamard_quantize(view, spec, backend="triton")
        assert torch.equal(fused, fake_quantize(hadamard_transform(view, backend="triton"), spec))
        assert_quantized_close(fused, _composition(view, spec), _transformed_for_steps(view, False), spec)


def _cuda_compute_scale_zero(xmin, xmax, spec, min_range=0.0):
    """utils.quant.compute_scale_zero as PyTorch evaluates it on CUDA tensors: ``span / maxq`` (a Python int) is
    ``span * (1.0f / maxq)`` there (ATen div_true_kernel_cuda), everything else the same IEEE float32 operations."""
    assert min_range == 0.0  # activations only
    inverse = torch.tensor(1.0, dtype=torch.float32) / spec.maxq  # the float32 reciprocal, as ATen computes it
    if spec.asym:
        both_zero = (xmin == 0) & (xmax == 0)
        xmin = torch.where(both_zero, -1.0, xmin)
        xmax = torch.where(both_zero, 1.0, xmax)
        scale = (xmax - xmin) * inverse
        return scale, torch.round(-xmin / scale)
    span = torch.maximum(xmin.abs(), xmax)
    scale = torch.where(span == 0, 1.0, span) * inverse
    return scale, torch.zeros_like(scale)


@pytest.mark.parametrize("spec", [SPECS[1], QuantSpec(bits=4, asym=True, groupsize=32)], ids=_spec_id)
def test_interpreter_fused_quantizer_follows_cuda_division_rule(interpreted, monkeypatch, spec):
    """The H100 mismatch, reproduced on the CPU: with CUDA's rule for ``span / maxq`` (product with the float32
    reciprocal) a bfloat16 4-bit quantizer moves ~0.15% of the values by one step against the IEEE division; the
    kernel follows the tensor's device, and with the CUDA rule forced it matches CUDA's composition bit for bit."""
    from utils import quant

    x = _inputs((4, 33, 64), torch.bfloat16)
    z = hadamard_transform(x, backend="triton")
    cpu_reference = fake_quantize(z, spec)
    assert torch.equal(hadamard_quantize(x, spec, backend="triton"), cpu_reference)  # CPU tensor: CPU rule

    monkeypatch.setattr(quant, "compute_scale_zero", _cuda_compute_scale_zero)
    cuda_reference = fake_quantize(z, spec)
    assert (cuda_reference != cpu_reference).any(), "the two division rules should differ on this data"
    monkeypatch.setattr(interpreted, "_torch_divides_by_reciprocal", lambda device: True)
    assert torch.equal(hadamard_quantize(x, spec, backend="triton"), cuda_reference)


def _tiny_quantized_model(intermediate: int):
    from spinquant.config import QuantConfig, RotationConfig
    from spinquant.quantize import quantize_
    from spinquant.rotation import rotate_
    from tests.helpers import make_tiny_model

    model = make_tiny_model("llama", hidden=64, heads=4, kv_heads=2, intermediate=intermediate)
    rotate_(model, RotationConfig(rotate=True))
    config = QuantConfig(a_bits=4, a_asym=True, a_clip_ratio=0.9, k_bits=4, k_asym=True, k_groupsize=16)
    quantize_(model, config, progress=False)
    return model.eval()


@pytest.mark.parametrize("intermediate", [128, 192])
def test_interpreter_model_uses_fused_kernels_and_matches_pytorch(interpreted, monkeypatch, intermediate):
    """W16A4K4 rotated tiny LLaMA: the forced triton backend runs R4 + down_proj input and R3 + K fused (4 calls
    per forward for 2 layers), and gives the PyTorch backend's logits: bit-identical with power-of-two sizes
    (intermediate 128, head_dim 16), and within a small tolerance when R4 has the factor 12 (192 = 12 * 16), where
    a few activations move by one 4-bit step."""
    model = _tiny_quantized_model(intermediate)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    calls = []
    original = interpreted.hadamard_quantize
    monkeypatch.setattr(interpreted, "hadamard_quantize", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        monkeypatch.setenv(hadamard.BACKEND_ENV_VAR, "torch")
        expected = model(ids).logits
        assert calls == []
        monkeypatch.setenv(hadamard.BACKEND_ENV_VAR, "triton")
        got = model(ids).logits
    assert len(calls) == 4
    # A quantization level flipped at a rounding boundary (see above) moves logits slightly, whatever n is.
    torch.testing.assert_close(got, expected, rtol=0, atol=0.05 * expected.abs().max().item())


# ------------------------------------------------------------------------------------------------ GPU

_needs_gpu = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA device and Triton")


def gpu(test):
    """GPU-only test: selectable with ``pytest -m gpu``, skipped without CUDA and Triton."""
    return pytest.mark.gpu(_needs_gpu(test))


@pytest.fixture(autouse=True)
def _default_launch_configs(monkeypatch):
    """Tests run the default launch layout: autotuning would compile every candidate layout for every case. The
    candidates themselves are checked by test_gpu_every_candidate_config and the tuner by its own test."""
    monkeypatch.setenv("SPINQUANT_TRITON_AUTOTUNE", "0")

# Every kind of size: powers of two up to 2^15, one size per Hadamard factor, and the real models' sizes:
# SmolLM2 1536 = 12 * 128, LLaMA-2-7B 11008 = 172 * 64, Mistral-7B 14336 = 28 * 512, LLaMA-2-13B 13824 = 108 * 128.
GPU_SIZES = (
    2, 16, 64, 128, 256, 1024, 2048, 4096, 8192, 16384, 32768,
    12 * 128, 20 * 64, 28 * 512, 36 * 64, 40 * 32, 44 * 64, 52 * 64, 60 * 64, 108 * 128, 140 * 32, 156 * 32,
    172 * 64,
)  # fmt: skip
GPU_DENSE_LIMIT = 16384  # above, the float64 reference is the PyTorch backend (the dense matrix would be 8 GiB)


def _gpu_reference(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] <= GPU_DENSE_LIMIT:
        return _dense_reference(x)
    return hadamard_transform(x.double(), backend="torch")


@gpu
@pytest.mark.parametrize("n", GPU_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_transform_matches_dense_reference(n, dtype):
    x = _inputs((3, 37, n), dtype, device="cuda")
    y = hadamard_transform(x, backend="triton")
    assert_transform_close(y, _gpu_reference(x))
    if _bit_identical_to_torch(n):
        assert torch.equal(y, hadamard_transform(x, backend="torch"))


@gpu
@pytest.mark.parametrize("n", GPU_SIZES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_gpu_gradient_is_g_times_h_transpose(n, dtype):
    x = _inputs((2, 9, n), dtype, device="cuda").requires_grad_(True)
    g = _inputs((2, 9, n), dtype, device="cuda", seed=1)
    hadamard_transform(x, backend="triton").backward(g)
    if n <= GPU_DENSE_LIMIT:
        reference = g.double() @ hadamard_matrix(n, torch.float64, device="cuda").T
    else:  # power of two: H is symmetric
        reference = hadamard_transform(g.double(), backend="torch")
    assert_transform_close(x.grad, reference)


GPU_FUSED_SIZES = (64, 128, 256, 512, 4096, 8192, 12 * 128, 172 * 64, 28 * 512)
GPU_FUSED_CASES = [
    *[(n, torch.bfloat16, spec) for n in GPU_FUSED_SIZES for spec in SPECS[:3]],
    *[(n, dtype, SPECS[0]) for n in GPU_FUSED_SIZES for dtype in (torch.float16, torch.float32)],
]


@gpu
@pytest.mark.parametrize(
    ("n", "dtype", "spec"), GPU_FUSED_CASES, ids=[f"{n}-{str(d)[6:]}-{_spec_id(s)}" for n, d, s in GPU_FUSED_CASES]
)
def test_gpu_fused_quantize_matches_composition(n, dtype, spec):
    x = _inputs((4, 33, n), dtype, device="cuda")
    fused = hadamard_quantize(x, spec, backend="triton")
    reference = _composition(x, spec)
    # The transforms may differ by float32 rounding (tensor-core path, m x m factor): one-step tolerance. The
    # quantizer itself follows PyTorch's CUDA arithmetic (span * (1/maxq)), so quantizing the kernel's own
    # transform gives the fused result bit for bit.
    assert_quantized_close(fused, reference, _transformed_for_steps(x, False), spec)
    assert torch.equal(fused, _quantized_kernel_transform(x, spec))


@gpu
@pytest.mark.parametrize("n", (128, 12 * 128, 172 * 64))
def test_gpu_fused_quantize_fp32_had(n):
    x = _inputs((4, 33, n), torch.bfloat16, device="cuda")
    spec = SPECS[0]
    fused = hadamard_quantize(x, spec, fp32=True, backend="triton")
    reference = _composition(x, spec, fp32=True)
    assert_quantized_close(fused, reference, _transformed_for_steps(x, True), spec)
    assert torch.equal(fused, _quantized_kernel_transform(x, spec, fp32=True))


@gpu
def test_gpu_any_leading_shape_and_strides():
    for name, x in _strided_cases().items():
        x = x.cuda()
        y = hadamard_transform(x, backend="triton")
        assert torch.equal(y, hadamard_transform(x.contiguous(), backend="triton")), name
        for spec in (QuantSpec(bits=4, asym=True, groupsize=x.shape[-1] // 2), SPECS[1]):
            fused = hadamard_quantize(x, spec, backend="triton")
            assert torch.equal(fused, fake_quantize(y, spec)), name
            if x.numel():
                assert_quantized_close(fused, _composition(x, spec), _transformed_for_steps(x, False), spec)
        if x.numel():
            assert_transform_close(y, _dense_reference(x))


@gpu
def test_gpu_auto_picks_triton_for_cuda_tensors(monkeypatch):
    monkeypatch.delenv(hadamard.BACKEND_ENV_VAR, raising=False)
    expected = "fast_hadamard_transform" if hadamard._fast_hadamard_transform_available() else "triton"
    assert hadamard._select_backend(torch.randn(2, 64, device="cuda"), None) is hadamard._BACKENDS[expected]


@gpu
@pytest.mark.parametrize("intermediate", [128, 192])
def test_gpu_model_matches_pytorch_backend(monkeypatch, intermediate):
    model = _tiny_quantized_model(intermediate).cuda()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        monkeypatch.setenv(hadamard.BACKEND_ENV_VAR, "torch")
        expected = model(ids).logits
        monkeypatch.setenv(hadamard.BACKEND_ENV_VAR, "triton")
        got = model(ids).logits
    # A quantization level flipped at a rounding boundary (see above) moves logits slightly, whatever n is.
    torch.testing.assert_close(got, expected, rtol=0, atol=0.05 * expected.abs().max().item())


@gpu
@pytest.mark.parametrize("n", (64, 256, 512, 8192, 12 * 128, 172 * 64))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_gpu_every_candidate_config(n, dtype):
    # The autotuner may pick any candidate layout: each must compute the right values (butterfly power of two:
    # bit-identical to the PyTorch backend), and its fused variant must quantize its own transform exactly.
    module = hadamard._triton_module()
    x = _inputs((8, 512, n), dtype, device="cuda")
    reference = _gpu_reference(x)
    quantized = _composition(x, SPECS[0])
    candidates = module.candidate_configs(n, x.numel() // n, dtype)
    assert len(candidates) >= 2
    for config in candidates:
        y = module.launch(x, config=config)
        q = module.launch(x, spec=SPECS[0], config=config)
        assert_transform_close(y, reference)
        if _bit_identical_to_torch(n) and not config.dot:  # butterflies: the PyTorch backend's order
            assert torch.equal(y, hadamard_transform(x, backend="torch")), config
        assert_quantized_close(q, quantized, _transformed_for_steps(x, False), SPECS[0])
        assert torch.equal(q, fake_quantize(y, SPECS[0])), config


@gpu
@pytest.mark.parametrize("n", (64, 256, 4096))
def test_gpu_direct_launch_respects_each_specialisation(n):
    # After the first launch the compiled kernel is called directly, keyed on what Triton specialises on: a
    # misaligned view, another stride pattern or a transposed layout after an aligned contiguous call must each
    # get their own kernel and the right values.
    module = hadamard._triton_module()
    flat = _inputs((64 * n + 8,), torch.bfloat16, device="cuda")
    aligned = flat[: 64 * n].view(64, n)
    for _ in range(2):
        y = module.launch(aligned)
    reference = _dense_reference(aligned)
    assert_transform_close(y, reference)
    for offset in (1, 8):  # 2 and 16 bytes: unaligned, then aligned again
        shifted = flat[offset : offset + 64 * n].view(64, n)
        for _ in range(2):
            assert_transform_close(module.launch(shifted), _dense_reference(shifted))
    wide = _inputs((8, 16, n + 16), torch.bfloat16, device="cuda")[..., :n]  # strided rows
    for _ in range(2):
        assert_transform_close(module.launch(wide), _dense_reference(wide))
    swapped = _inputs((16, 8, n), torch.bfloat16, device="cuda").transpose(0, 1)  # two leading levels
    for _ in range(2):
        assert_transform_close(module.launch(swapped), _dense_reference(swapped))
    assert module._DIRECT is not None


@gpu
def test_gpu_autotuner_keeps_the_fastest_candidate(monkeypatch, tmp_path):
    monkeypatch.setenv("SPINQUANT_TRITON_AUTOTUNE", "1")
    module = hadamard._triton_module()
    monkeypatch.setattr(module, "_TUNED", {})
    monkeypatch.setattr(module, "_DISK_LOADED", set())
    monkeypatch.setattr(module, "_tuning_file", lambda: tmp_path / "tuned.json")
    x = _inputs((5000, 512), torch.bfloat16, device="cuda")
    y = hadamard_transform(x, backend="triton")
    assert_transform_close(y, _dense_reference(x))
    chosen = list(module.tuned_configs().values())
    assert len(chosen) == 1 and tuple(chosen[0]) in module.candidate_configs(512, 5000, torch.bfloat16)
    # Cached in the process and on disk: a later call, or a new process, does not time the candidates again.
    module._TUNED.clear()
    module._DISK_LOADED.clear()
    monkeypatch.setattr(module, "candidate_configs", lambda *args: pytest.fail("tuned again"))
    hadamard_transform(x, backend="triton")
    assert list(module.tuned_configs().values()) == chosen
