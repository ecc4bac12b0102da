"""GPTQ: beats RTN on the objective it minimises, stays on the stored grid, and runs layer by layer correctly."""

from __future__ import annotations

import json

import pytest
import torch

from eval_utils import gptq as gptq_module
from eval_utils.gptq import (
    GPTQConfig,
    HessianAccumulator,
    activation_quant_off,
    gptq_quantize_model,
    gptq_quantize_weight,
)
from spinquant.config import QuantConfig, RotationConfig
from spinquant.model import QuantLinear, decoder_layers
from spinquant.quantize import quantize_
from spinquant.rotation import rotate_
from tests.conftest import requires_smollm2
from tests.helpers import make_tiny_model
from utils.hadamard import hadamard_transform
from utils.quant import QuantSpec, quantize_weight_rtn


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Small tensors: one intra-op thread avoids OpenMP oversubscription on the shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _correlated_problem(seed: int = 0, n: int = 2048, cin: int = 128, cout: int = 48):
    """Inputs with strongly correlated features and a few large-magnitude ones (as LLM activations have)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cin) + 2 * torch.randn(cin, cin, generator=g) / cin**0.5
    x = torch.randn(n, cin, generator=g) @ mix
    x[:, :8] *= 8
    w = 0.1 * torch.randn(cout, cin, generator=g)
    return x, w, 2 * x.T @ x / n


def _levels(weight, scale, zero, groupsize):
    """The integer level of every weight under its group's (scale, zero), before rounding."""
    cols = weight.shape[1]
    size = groupsize if groupsize > 0 else cols
    return weight / scale.repeat_interleave(size, 1) + zero.repeat_interleave(size, 1)


CASES = [
    (QuantSpec(4), False, False),
    (QuantSpec(4), True, False),
    (QuantSpec(4, asym=True), True, True),
    (QuantSpec(4, asym=True, groupsize=32), False, False),
    (QuantSpec(4, asym=True, groupsize=32), True, False),
    (QuantSpec(4, groupsize=32), True, True),
    (QuantSpec(3, asym=True, groupsize=64), False, True),
]


@pytest.mark.parametrize("spec,clip,act_order", CASES)
def test_output_error_below_rtn(spec, clip, act_order):
    x, w, h = _correlated_problem()
    result = gptq_quantize_weight(w, h, spec, clip_search=clip, act_order=act_order)
    rtn, _, _ = quantize_weight_rtn(w, spec, clip_search=clip)
    gptq_err = torch.linalg.norm(x @ (w - result.weight).T)
    rtn_err = torch.linalg.norm(x @ (w - rtn).T)
    # GPTQ minimises exactly this error; on correlated inputs it roughly halves RTN's (measured 0.45-0.55x).
    # 0.8x leaves room for seeds while still failing if the error feedback were missing or wrong.
    assert gptq_err < 0.8 * rtn_err, (float(gptq_err), float(rtn_err))


@pytest.mark.parametrize("spec,clip,act_order", CASES)
def test_weights_lie_on_the_stored_grid(spec, clip, act_order):
    _, w, h = _correlated_problem(seed=1)
    result = gptq_quantize_weight(w, h, spec, clip_search=clip, act_order=act_order)
    n_groups = w.shape[1] // spec.groupsize if spec.groupsize > 0 else 1
    assert result.scale.shape == result.zero.shape == (w.shape[0], n_groups)
    levels = _levels(result.weight, result.scale, result.zero, spec.groupsize)
    # float32 weight = scale * (q - zero) computed in float32: off the integer by round-off only (~1e-6).
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    low, high = (0, spec.maxq) if spec.asym else (-(spec.maxq + 1), spec.maxq)
    assert levels.round().min() >= low and levels.round().max() <= high
    if not spec.asym:
        assert torch.all(result.zero == 0)


@pytest.mark.parametrize("spec,clip,act_order", CASES)
def test_identity_hessian_gives_rtn(spec, clip, act_order):
    """Uncorrelated unit inputs: no error to feed forward, so GPTQ must reduce to RTN (same grid, same values)."""
    _, w, _ = _correlated_problem(seed=2)
    result = gptq_quantize_weight(w, torch.eye(w.shape[1]), spec, clip_search=clip, act_order=act_order)
    rtn, scale, zero = quantize_weight_rtn(w, spec, clip_search=clip)
    torch.testing.assert_close(result.scale, scale.float(), rtol=0, atol=0)
    torch.testing.assert_close(result.zero, zero.float(), rtol=0, atol=0)
    torch.testing.assert_close(result.weight, rtn, rtol=0, atol=1e-6)


def test_dynamic_groups_are_found_on_updated_weights():
    """Without act_order, a group's grid comes from the weights as GPTQ has updated them (not the originals)."""
    _, w, h = _correlated_problem(seed=3)
    spec = QuantSpec(4, asym=True, groupsize=32)
    result = gptq_quantize_weight(w, h, spec)
    _, original_scale, _ = quantize_weight_rtn(w, spec)
    torch.testing.assert_close(result.scale[:, 0], original_scale[:, 0].float())  # first group: nothing updated yet
    assert not torch.allclose(result.scale[:, 1:], original_scale[:, 1:].float())


def test_dead_inputs_get_zero_weights():
    x, w, _ = _correlated_problem(seed=4)
    x[:, 5] = 0
    h = 2 * x.T @ x / x.shape[0]
    result = gptq_quantize_weight(w, h, QuantSpec(4), act_order=True)
    assert torch.all(result.weight[:, 5] == 0)


def test_clear_errors():
    _, w, h = _correlated_problem()
    with pytest.raises(ValueError, match="--w_groupsize"):
        gptq_quantize_weight(w, h, QuantSpec(4, groupsize=48))
    with pytest.raises(ValueError, match="--percdamp"):
        gptq_quantize_weight(w, -torch.eye(w.shape[1]), QuantSpec(4), percdamp=0.01)
    with pytest.raises(ValueError, match="--nsamples"):
        GPTQConfig(nsamples=0)
    with pytest.raises(ValueError, match="--percdamp"):
        GPTQConfig(percdamp=-1)


def test_hessian_accumulator_is_the_mean_outer_product():
    x = torch.randn(3, 10, 6, dtype=torch.float64)
    acc = HessianAccumulator(6, "cpu")
    acc.add(x[:2])
    acc.add(x[2:])
    flat = x.reshape(-1, 6).float()
    torch.testing.assert_close(acc.hessian(), 2 * flat.T @ flat / 30, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Layer by layer on a tiny model
# ---------------------------------------------------------------------------------------------------------------


def _rotated_tiny(seed: int = 0):
    model = make_tiny_model("llama", seed=seed)
    rotate_(model, RotationConfig(rotate=True, mode="hadamard", seed=0))
    return model


def _spy_hessians(monkeypatch) -> dict:
    """Record the Hessian each linear is quantized against, keyed by call order."""
    seen: list = []
    original = gptq_module.gptq_quantize_weight

    def spy(weight, hessian, spec, **kwargs):
        seen.append((weight.data_ptr(), hessian.clone()))
        return original(weight, hessian, spec, **kwargs)

    monkeypatch.setattr(gptq_module, "gptq_quantize_weight", spy)
    return seen


def _inputs_of(model, module, windows, after_hadamard=False):
    """The raw inputs ``module`` receives when ``model`` runs on ``windows`` (activation quantizers off)."""
    captured = []
    handle = module.register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
    with torch.no_grad(), activation_quant_off(model):
        model(input_ids=windows)
    handle.remove()
    x = captured[0].reshape(-1, module.in_features)
    return hadamard_transform(x) if after_hadamard else x


def test_layer_by_layer_hessians_come_from_quantized_predecessors(monkeypatch):
    windows = torch.randint(0, 300, (6, 24), generator=torch.Generator().manual_seed(0))
    model = _rotated_tiny()
    reference = _rotated_tiny()  # the same rotated model, never quantized
    seen = _spy_hessians(monkeypatch)
    summary = gptq_quantize_model(model, windows, QuantConfig(w_bits=4), GPTQConfig(batch_size=4), progress=False)
    hessians = {ptr: h for ptr, h in seen}
    layers, ref_layers = decoder_layers(model), decoder_layers(reference)
    assert len(summary["losses"]) == 7 * len(layers)

    def expected(x):
        x = x.float()
        return 2 * x.T @ x / x.shape[0]

    # float32 layer math batched differently (4 + 2 windows vs 6): round-off ~1e-6 relative.
    tol = dict(rtol=1e-4, atol=1e-5)
    # Layer 0's q/k/v see the embeddings: the unquantized model gives the same inputs.
    q0 = layers[0].self_attn.q_proj
    embedded = expected(_inputs_of(reference, ref_layers[0].self_attn.q_proj, windows))
    torch.testing.assert_close(hessians[q0.weight.data_ptr()], embedded, **tol)
    # Layer 1's q_proj sees the output of the *quantized* layer 0 (and differs from the float model's).
    q1 = layers[1].self_attn.q_proj
    quantized_input = expected(_inputs_of(model, q1, windows))
    torch.testing.assert_close(hessians[q1.weight.data_ptr()], quantized_input, **tol)
    float_input = expected(_inputs_of(reference, ref_layers[1].self_attn.q_proj, windows))
    assert not torch.allclose(quantized_input, float_input, **tol)
    # down_proj's Hessian is that of its input AFTER the online Hadamard R4 (what its matmul multiplies).
    down = layers[0].mlp.down_proj
    assert down.input_hadamard
    after = expected(_inputs_of(model, down, windows, after_hadamard=True))
    torch.testing.assert_close(hessians[down.weight.data_ptr()], after, **tol)
    before = expected(_inputs_of(model, down, windows))
    assert not torch.allclose(after, before, **tol)


def test_model_weights_on_grid_and_activation_quantizers_kept():
    windows = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    model = _rotated_tiny()
    config = QuantConfig(w_bits=4, w_groupsize=16, w_asym=True, w_clip=True, a_bits=4, k_bits=4, v_bits=4)
    quantize_(model, QuantConfig(a_bits=4, k_bits=4, v_bits=4), progress=False)  # quantizers already installed
    before = {name: m.input_quantizer for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    gptq_quantize_model(model, windows, config, GPTQConfig(act_order=True, batch_size=3), progress=False)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            assert module.input_quantizer is before[name]
            assert module.weight_spec == config.weight
            levels = _levels(module.weight.data, module.weight_scale, module.weight_zero, 16)
            torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
            assert levels.round().min() >= 0 and levels.round().max() <= 15
    assert model.spinquant_gptq.act_order


def test_activation_quant_off_restores_everything():
    model = _rotated_tiny()
    quantize_(model, QuantConfig(a_bits=4, k_bits=4, v_bits=4), progress=False)
    attn = decoder_layers(model)[0].self_attn
    state = (attn.input_quantizer, attn.o_proj.input_quantizer, attn.v_proj.output_quantizer, attn.k_quant_spec)
    assert all(item is not None for item in state) and attn.qk_hadamard
    with activation_quant_off(model):
        assert attn.input_quantizer is None and attn.o_proj.input_quantizer is None
        assert attn.v_proj.output_quantizer is None and attn.k_quant_spec is None and not attn.qk_hadamard
    assert (attn.input_quantizer, attn.o_proj.input_quantizer, attn.v_proj.output_quantizer, attn.k_quant_spec) == state
    assert attn.qk_hadamard


def test_gptq_lowers_the_layer_output_error_of_the_whole_model():
    """Whole tiny model, W3 per-channel: final hidden states are closer to the float model's than with RTN."""
    windows = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(2))
    reference = _rotated_tiny()
    with torch.no_grad():
        target = reference.model(input_ids=windows).last_hidden_state
    errors = {}
    for method in ("rtn", "gptq"):
        model = _rotated_tiny()
        config = QuantConfig(w_bits=3)
        if method == "gptq":
            gptq_quantize_model(model, windows, config, GPTQConfig(batch_size=8), progress=False)
        quantize_(model, config, weights=method == "rtn", progress=False)
        with torch.no_grad():
            errors[method] = torch.linalg.norm(model.model(input_ids=windows).last_hidden_state - target).item()
    # Measured on calibration data, which GPTQ fits: its error is well below RTN's (about 0.6x here).
    assert errors["gptq"] < 0.9 * errors["rtn"], errors


# ---------------------------------------------------------------------------------------------------------------
# Entry point and the real model
# ---------------------------------------------------------------------------------------------------------------


def _ptq(tiny_model_dir, tiny_data_dir, tmp_path, *extra):
    from spinquant.ptq import main

    out = tmp_path / "result.json"
    argv = [
        "--input_model", str(tiny_model_dir), "--data_dir", str(tiny_data_dir), "--model_max_length", "32",
        "--result_json", str(out), "--no_progress", "--eval_windows", "2", *extra,
    ]
    return main(argv), out


def test_cli_runs_gptq_by_default(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    code, out = _ptq(
        tiny_model_dir, tiny_data_dir, tmp_path, "--w_bits", "4", "--a_bits", "4", "--k_bits", "4", "--v_bits",
        "4", "--w_clip", "--a_asym", "--rotate", "--nsamples", "4", "--calib_split", "validation", "--act_order",
        "--w_groupsize", "16",
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["weight_method"] == "gptq"
    assert result["gptq"]["nsamples"] == 4 and result["gptq"]["seqlen"] == 32 and result["gptq"]["act_order"]
    assert len(result["gptq"]["losses"]) == 14 and all(v >= 0 for v in result["gptq"]["losses"].values())
    assert {"load_calibration", "gptq", "quantize", "eval_ppl"} <= set(result["timings"])
    assert 1 < result["wiki2_ppl"] < 1e6
    assert result["zeroshot"] is None


def test_cli_w_rtn_skips_gptq(tiny_model_dir, tiny_data_dir, tmp_path):
    code, out = _ptq(tiny_model_dir, tiny_data_dir, tmp_path, "--w_bits", "4", "--w_rtn")
    assert code == 0
    result = json.loads(out.read_text())
    assert result["weight_method"] == "rtn" and result["gptq"] is None and "gptq" not in result["timings"]


def test_cli_missing_calibration_split_is_a_clear_error(tiny_model_dir, tmp_path, caplog, shared_data_dir):
    code, _ = _ptq(tiny_model_dir, shared_data_dir, tmp_path, "--w_bits", "4")  # train is not shipped
    assert code == 2 and "train" in caplog.text


@requires_smollm2
@pytest.mark.slow
def test_smollm2_w4_gptq_perplexity_at_or_below_rtn(shared_data_dir):
    """Real SmolLM2-135M, W4 per-channel with random Hadamard rotation (the benchmark's weight format without the
    clip search, which would cost minutes on a CPU): 8 calibration windows of 256 tokens from validation,
    perplexity on 4 test windows of 256."""
    from eval_utils.perplexity import evaluate_perplexity
    from spinquant.model import load_model
    from utils.data import get_calibration_windows, get_eval_windows

    ppl = {}
    for method in ("rtn", "gptq"):
        model, tokenizer = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
        rotate_(model, RotationConfig(rotate=True, mode="hadamard", seed=0))
        config = QuantConfig(w_bits=4)
        if method == "gptq":
            calibration = get_calibration_windows(
                tokenizer, 8, 256, seed=0, split="validation", data_dir=shared_data_dir
            )
            gptq_quantize_model(model, calibration, config, GPTQConfig(batch_size=8), progress=False)
        quantize_(model, config, weights=method == "rtn", progress=False)
        windows = get_eval_windows(tokenizer, 256, split="test", data_dir=shared_data_dir)[:4]
        ppl[method] = evaluate_perplexity(model, windows, batch_size=4, progress=False)["ppl"]
    print(f"SmolLM2 W4 ppl: {ppl}")
    # On a 4-window sample the noise is a few percent; GPTQ at W4 per-channel is typically 10-30% better.
    assert ppl["gptq"] <= ppl["rtn"], ppl
