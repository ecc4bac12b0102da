"""The paper's figures: the numbers behind them (kurtosis, SQNR, outliers, perplexity groups) and the files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from eval_utils import figures
from eval_utils.figures import (
    capture_layer_input,
    channel_max_abs,
    group_ppl_results,
    kurtosis,
    load_ppl_results,
    plot_loss_curves,
    plot_outliers,
    plot_ppl_distribution,
    plot_sqnr,
    ppl_group_stats,
    prepare_before_after,
    resolve_layer,
    sqnr_db,
)
from spinquant.config import QuantConfig, RotationConfig
from tests.conftest import requires_smollm2
from tests.helpers import make_tiny_model
from utils.hadamard import hadamard_matrix
from utils.quant import QuantSpec, fake_quantize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png_and_json(numbers: dict) -> dict:
    png = numbers["png"]
    with open(png, "rb") as handle:
        data = handle.read()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    with open(numbers["json"], encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def tiny_pair():
    """(before, after, windows): a tiny LLaMA norm-fused vs rotated by a random Hadamard R1/R2 + R4."""
    model = make_tiny_model("llama")
    before, after, _ = prepare_before_after(model, RotationConfig(rotate=True, mode="hadamard", seed=0), before="fused")
    windows = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    return before, after, windows


# ---------------------------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------------------------


def test_kurtosis_matches_the_formula():
    # 1..5: mean 3, central moments m2 = 10/5 = 2, m4 = 34/5 = 6.8, so m4 / m2^2 = 1.7 exactly.
    assert kurtosis(torch.arange(1.0, 6.0)) == pytest.approx(1.7, abs=1e-12)
    # A two-point distribution +-a has kurtosis 1; scale and shift do not change it.
    assert kurtosis(torch.tensor([-3.0, 3.0] * 10) * 7 + 2) == pytest.approx(1.0, abs=1e-12)
    # 1e6 Gaussian samples: 3 within sampling error (sd of the estimate ~ sqrt(24 / n) ~ 0.005).
    gaussian = torch.randn(1000, 1000, generator=torch.Generator().manual_seed(0))
    assert kurtosis(gaussian) == pytest.approx(3.0, abs=0.03)
    with pytest.raises(ValueError, match="constant"):
        kurtosis(torch.ones(10))


def test_sqnr_of_a_known_quantization():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.5]])
    xq = fake_quantize(x, QuantSpec(bits=2, asym=True))
    # 2-bit asym over [0, 3.5]: scale 3.5/3, grid {0, 7/6, 7/3, 3.5}; 1 -> 7/6, 2 -> 7/3.
    torch.testing.assert_close(xq, torch.tensor([[0.0, 7 / 6, 7 / 3, 3.5]]))
    expected = 10 * math.log10(17.25 / ((1 / 6) ** 2 + (1 / 3) ** 2))  # = 20.9406... dB
    # float32 quantization: the noise is exact to ~1e-7 relative, i.e. ~1e-6 dB.
    assert sqnr_db(x, xq) == pytest.approx(expected, abs=1e-4)
    assert sqnr_db(x, x) == math.inf


def test_channel_max_abs_over_tokens():
    x = torch.tensor([[[1.0, -5.0, 0.5]], [[-2.0, 1.0, 0.25]]])
    assert channel_max_abs(x).tolist() == [2.0, 5.0, 0.5]


def test_bad_layer_and_module_are_clear_errors(tiny_pair):
    before, _, windows = tiny_pair
    assert resolve_layer(before, None) == 1 and resolve_layer(before, -1) == 1
    with pytest.raises(ValueError, match="layer 2 is out of range: the model has 2 decoder layers"):
        resolve_layer(before, 2)
    with pytest.raises(ValueError, match="unknown module"):
        capture_layer_input(before, windows, 0, "o_proj", progress=False)


# ---------------------------------------------------------------------------------------------------------------
# What the taps capture
# ---------------------------------------------------------------------------------------------------------------


def test_captured_inputs_are_the_rotated_ones(tiny_pair):
    """After rotation the attention input is (norm-fused input) @ R1 and down_proj's is (its input) @ H4."""
    before, after, windows = tiny_pair
    model = make_tiny_model("llama")
    from spinquant.rotation import rotate_

    rotations = rotate_(model, RotationConfig(rotate=True, mode="hadamard", seed=0))
    for layer in (0, 1):
        x_before = capture_layer_input(before, windows, layer, "q_proj-input", progress=False)
        x_after = capture_layer_input(after, windows, layer, "q_proj-input", progress=False)
        expected = (x_before.double() @ rotations["R1"]).float()
        torch.testing.assert_close(x_after, expected, rtol=0, atol=1e-4)
        d_before = capture_layer_input(before, windows, layer, "down_proj", progress=False)
        d_after = capture_layer_input(after, windows, layer, "down_proj", progress=False)
        torch.testing.assert_close(d_after, d_before @ hadamard_matrix(96), rtol=0, atol=1e-4)
    assert x_after.shape == (2 * 24, 64) and d_after.shape == (2 * 24, 96)


def test_rotation_removes_an_injected_outlier_channel(tmp_path):
    """A residual-stream channel at 8 (the rest ~N(0, 0.2)) is one huge spike before rotation, spread after."""
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] = 8.0  # a "massive activation" channel, as in real LLMs
    before, after, _ = prepare_before_after(model, RotationConfig(rotate=True, mode="hadamard", seed=1), before="fused")
    windows = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    numbers = plot_outliers(before, after, windows, tmp_path / "outliers.png", layer=0, progress=False)
    saved = _assert_png_and_json(numbers)
    b, a = saved["before"], saved["after"]
    assert b["top_channels"][0] == 5
    # Before: after the RMSNorm channel 5 is ~7.8 on every token, the other channels' maxima ~0.5.
    assert b["max_over_median"] > 10 and b["kurtosis"] > 20
    # After a Hadamard R1 the spike is spread over all 64 channels: +-7.8 / sqrt(64) ~ +-1 everywhere.
    assert a["max_abs"] < 0.5 * b["max_abs"] and a["max_over_median"] < 3 and a["kurtosis"] < 5
    assert len(b["channel_max_abs"]) == 64 and saved["layer"] == 0 and saved["module"] == "q_proj-input"


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------


def test_outliers_figure_on_down_proj(tiny_pair, tmp_path):
    before, after, windows = tiny_pair
    numbers = plot_outliers(before, after, windows, tmp_path / "o.png", module="down_proj-input", progress=False)
    saved = _assert_png_and_json(numbers)
    assert saved["layer"] == 1 and saved["module"] == "down_proj-input"
    assert saved["before"]["channels"] == saved["after"]["channels"] == 96
    assert "norms fused" in saved["before"]["label"] and "Hadamard" in saved["after"]["label"]


def test_sqnr_figure(tiny_pair, tmp_path):
    before, after, windows = tiny_pair
    quant = QuantConfig(w_bits=4, a_bits=4, a_asym=True)
    numbers = plot_sqnr(before, after, windows, tmp_path / "sqnr.png", quant=quant, progress=False)
    saved = _assert_png_and_json(numbers)
    for side in ("before", "after"):
        acts = saved[side]["activation"]
        assert len(acts["q_proj-input"]) == len(acts["down_proj-input"]) == 2
        assert len(saved[side]["weight"]["layer"]) == 2
        assert all(5 < v < 40 for v in acts["q_proj-input"] + saved[side]["weight"]["layer"])
    # Layer 0's attention input, recomputed by hand from the captured activations.
    x = capture_layer_input(before, windows, 0, "q_proj-input", progress=False)
    xq = fake_quantize(x, quant.act)
    assert saved["before"]["activation"]["q_proj-input"][0] == pytest.approx(sqnr_db(x, xq), abs=1e-3)
    per_token = [sqnr_db(x[t], xq[t]) for t in range(x.shape[0])]
    assert saved["before"]["activation"]["q_proj-input token_mean"][0] == pytest.approx(
        sum(per_token) / len(per_token), abs=1e-3
    )
    with pytest.raises(ValueError, match="a_bits < 16"):
        plot_sqnr(before, after, windows, tmp_path / "x.png", quant=QuantConfig(w_bits=4), progress=False)


def _write_result(folder, name, ppl, **config):
    folder.mkdir(parents=True, exist_ok=True)
    base = {"rotate": True, "rotate_mode": "hadamard", "optimized_rotation_path": None, "w_bits": 4, "a_bits": 4,
            "k_bits": 4, "v_bits": 4, "seed": 0}
    label = config.pop("label", None)
    data = {"wiki2_ppl": ppl, "config": {**base, **config}}
    if label:
        data["label"] = label
    (folder / name).write_text(json.dumps(data))


def test_ppl_distribution_groups_and_stats(tmp_path):
    results = tmp_path / "results"
    for seed in range(10):
        _write_result(results / "random", f"r{seed}.json", 20.0 + seed, rotate_mode="random", seed=seed)
        _write_result(results / "hadamard", f"h{seed}.json", 15.0 + 0.5 * seed, rotate_mode="hadamard", seed=seed)
    _write_result(results, "learned.json", 12.0, optimized_rotation_path="/x/R.bin")
    _write_result(results, "released.json", 11.0, optimized_rotation_path="/y/R.bin", label="released R.bin")
    _write_result(results, "norot.json", 3000.0, rotate=False)
    _write_result(results, "diverged.json", float("inf"), rotate_mode="random", seed=99)
    (results / "optimize_rotation.json").write_text(json.dumps({"steps": 10}))  # not a ppl result: skipped

    loaded = load_ppl_results(results)
    assert len(loaded) == 24
    groups = group_ppl_results(loaded)
    assert list(groups) == ["random orthogonal", "random Hadamard", "learned", "no rotation", "released R.bin"]
    assert [len(g) for g in groups.values()] == [11, 10, 1, 1, 1]

    numbers = plot_ppl_distribution(str(results / "**" / "*.json"), tmp_path / "ppl.png")
    saved = _assert_png_and_json(numbers)
    rnd, had = saved["groups"]["random orthogonal"], saved["groups"]["random Hadamard"]
    assert (rnd["n"], rnd["n_nonfinite"], rnd["min"], rnd["median"], rnd["max"]) == (10, 1, 20.0, 24.5, 29.0)
    assert rnd["std"] == pytest.approx(math.sqrt(sum((v - 24.5) ** 2 for v in range(20, 30)) / 9))
    assert (had["min"], had["median"], had["max"]) == (15.0, 17.25, 19.5)
    assert saved["groups"]["learned"]["std"] is None  # one run: no spread
    assert saved["log_y"] is True  # 3000 vs 11
    assert saved["warnings"] == []

    by_mode = group_ppl_results(loaded, group_by="rotate_mode")
    assert set(by_mode) == {"rotate_mode=random", "rotate_mode=hadamard"}
    with pytest.raises(ValueError, match="has no 'label' key"):
        group_ppl_results(loaded, group_by="label")


def test_ppl_distribution_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no JSON files matched"):
        load_ppl_results(str(tmp_path / "*.json"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ppl_results(tmp_path / "missing")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="wiki2_ppl"):
        load_ppl_results(tmp_path)
    _write_result(tmp_path / "few", "a.json", 10.0, rotate_mode="random")
    numbers = plot_ppl_distribution(tmp_path / "few", tmp_path / "few.png")
    assert any("fewer than the paper's 10 seeds" in w for w in numbers["warnings"])


def test_ppl_group_stats_by_hand():
    stats = ppl_group_stats([4.0, 1.0, 3.0, 2.0, float("nan")])
    assert stats == {"n": 4, "n_nonfinite": 1, "min": 1.0, "median": 2.5, "max": 4.0, "mean": 2.5,
                     "std": pytest.approx(math.sqrt(5 / 3))}


def test_loss_curves_single_and_overlaid(tmp_path):
    logs = []
    for run in range(2):
        path = tmp_path / f"run{run}" / "train_log.jsonl"
        path.parent.mkdir()
        lines = (json.dumps({"step": s, "loss": 5 - 0.1 * s - run, "lr": 1.5}) + "\n" for s in range(1, 11))
        path.write_text("".join(lines))
        logs.append(path)
    single = _assert_png_and_json(plot_loss_curves(logs[:1], tmp_path / "one.png"))
    assert single["curves"][0]["label"] == "run0" and single["curves"][0]["last_loss"] == pytest.approx(4.0)
    both = _assert_png_and_json(plot_loss_curves(logs, tmp_path / "two.png", labels=["a", "b"]))
    assert [c["label"] for c in both["curves"]] == ["a", "b"] and both["curves"][1]["first_loss"] == pytest.approx(3.9)
    with pytest.raises(FileNotFoundError):
        plot_loss_curves([tmp_path / "nope.jsonl"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="2 labels for 1 logs"):
        plot_loss_curves(logs[:1], tmp_path / "x.png", labels=["a", "b"])


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def test_cli_outliers_end_to_end(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "figs" / "outliers.png"
    code = figures.main([
        "outliers", "--model", str(tiny_model_dir), "--data_dir", str(tiny_data_dir), "--device", "cpu",
        "--nsamples", "2", "--seqlen", "32", "--layer", "1", "--module", "down_proj", "--no_progress",
        "--out", str(out),
    ])
    assert code == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert (saved["layer"], saved["windows"], saved["seqlen"], saved["before_kind"]) == (1, 2, 32, "original")
    assert "kurtosis" in capsys.readouterr().out


def test_cli_sqnr_end_to_end(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "sqnr.png"
    code = figures.main([
        "sqnr", "--model", str(tiny_model_dir), "--data_dir", str(tiny_data_dir), "--device", "cpu",
        "--nsamples", "1", "--seqlen", "32", "--a_bits", "8", "--no-a_asym", "--w_bits", "3", "--w_clip",
        "--act_reduce", "token_mean", "--before", "fused", "--rotate_mode", "random", "--no_progress",
        "--out", str(out),
    ])
    assert code == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["quant"]["activation"] == "8-bit sym per token" and saved["quant"]["w_clip"] is True
    assert saved["act_reduce_plotted"] == "token_mean" and saved["rotation"]["mode"] == "random"
    assert "per-token mean" in capsys.readouterr().out
    assert figures.main(["sqnr", "--a_bits", "16", "--out", str(out)]) == 2  # fails before loading a model


def test_cli_ppl_distribution_and_errors(tmp_path, capsys):
    for seed in range(3):
        _write_result(tmp_path / "res", f"{seed}.json", 10.0 + seed, label="mine")
    out = tmp_path / "ppl.png"
    assert figures.main(["ppl-distribution", str(tmp_path / "res"), "--group_by", "label", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mine" in printed and "11.000" in printed and out.is_file()
    assert figures.main(["ppl-distribution", str(tmp_path / "nothing*.json"), "--out", str(out)]) == 2
    assert figures.main(["outliers", "--module", "o_proj", "--out", str(out)]) == 2  # fails before loading a model
    with pytest.raises(SystemExit):
        figures.main(["no-such-kind", "--out", str(out)])


# ---------------------------------------------------------------------------------------------------------------
# The real SmolLM2 (slow)
# ---------------------------------------------------------------------------------------------------------------


@requires_smollm2
@pytest.mark.slow
def test_real_smollm2_rotation_flattens_outliers(shared_data_dir, tmp_path):
    from spinquant.model import load_model
    from utils.data import get_eval_windows

    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    windows = get_eval_windows(tokenizer, 128, split="test", data_dir=shared_data_dir)[:1]
    before, after, _ = prepare_before_after(model, RotationConfig(rotate=True, mode="hadamard", seed=0))
    numbers = plot_outliers(before, after, windows, tmp_path / "o.png", progress=False)
    assert numbers["layer"] == 15
    # SmolLM2's middle-layer attention input has a few channels far above the rest (kurtosis in the hundreds);
    # a Hadamard R1 leaves a near-Gaussian distribution (kurtosis ~3).
    assert numbers["before"]["kurtosis"] > 20 and numbers["after"]["kurtosis"] < 6
    assert numbers["after"]["max_over_median"] < numbers["before"]["max_over_median"] / 3
