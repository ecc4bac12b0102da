"""The paper's figures as commands: activation outliers, quantization SQNR, the perplexity spread, loss curves.

Four kinds, each a function (for the experiment driver) and a sub-command; every PNG gets its numbers in a
JSON file of the same name next to it (``fig.png`` -> ``fig.json``), both written atomically::

    python -m eval_utils.figures outliers --layer 15 --module q_proj-input --nsamples 4 --seqlen 512 \\
        --data_dir ../shared/data --out figs/outliers.png
    python -m eval_utils.figures sqnr --nsamples 4 --seqlen 512 --data_dir ../shared/data --out figs/sqnr.png
    python -m eval_utils.figures ppl-distribution outputs/sweep/ --group_by auto --out figs/ppl.png
    python -m eval_utils.figures loss-curve run1/train_log.jsonl run2/train_log.jsonl --labels a b --out loss.png

What is plotted ("what the quantizer sees"):

* **attention input** (``q_proj-input``): the shared input of q/k/v, i.e. the attention block's input -- the
  output of the RMSNorm. In the rotated model the norm scale is fused into q/k/v and the input is multiplied
  by R1; in the "before" model it is whatever that model feeds its attention block.
* **down_proj input** (``down_proj-input``): down_proj's input, after the online Hadamard R4 when the model
  has one (what the matmul and its input quantizer see, :meth:`QuantLinear.matmul_input` minus quantization).

The "before" model is, by default, the original model (``before="original"``): that is exactly what the
no-rotation W4A4 baseline quantizes, since ``rotate_`` without ``--rotate`` changes nothing (the RMSNorm scale
is still applied to the activations and the weights keep their own scale). ``before="fused"`` instead folds
the norm scales into the weights without rotating, so that "before" and "after" differ by R1 (and R4) alone.

Definitions used in the numbers:

* kurtosis: Pearson's (non-excess) kurtosis ``E[(x - mu)^4] / E[(x - mu)^2]^2`` of all entries of the
  activation tensor (tokens x channels) -- a Gaussian has 3, heavy-tailed (outlier) distributions more;
* SQNR: ``10 log10(sum x^2 / sum (x - Q(x))^2)`` in dB, summed over every token of every window (activations)
  or every entry of the seven projection weights of a layer (weights).
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from spinquant.config import QuantConfig, RotationConfig
from spinquant.model import QuantLinear, decoder_layers, get_architecture, load_model
from spinquant.quantize import weight_spec_for
from spinquant.rotation import fuse_layer_norms, rotate_
from utils.hadamard import hadamard_transform
from utils.io import atomic_write, write_json
from utils.quant import QuantSpec, fake_quantize, quantize_weight_rtn

logger = logging.getLogger(__name__)

__all__ = [
    "MODULES",
    "kurtosis",
    "sqnr_db",
    "channel_max_abs",
    "resolve_module",
    "resolve_layer",
    "capture_layer_input",
    "activation_sqnr_per_layer",
    "weight_sqnr_per_layer",
    "prepare_before_after",
    "plot_outliers",
    "plot_sqnr",
    "load_ppl_results",
    "group_ppl_results",
    "ppl_group_stats",
    "plot_ppl_distribution",
    "read_train_log",
    "plot_loss_curves",
    "json_path_for",
    "format_ppl_table",
    "build_parser",
    "run",
    "main",
]

ATTN_INPUT = "q_proj-input"
DOWN_PROJ_INPUT = "down_proj-input"
MODULES = (ATTN_INPUT, DOWN_PROJ_INPUT)
_MODULE_ALIASES = {
    "q_proj-input": ATTN_INPUT, "q_proj": ATTN_INPUT, "qkv": ATTN_INPUT, "attn": ATTN_INPUT,
    "attn-input": ATTN_INPUT, "attention": ATTN_INPUT, "self_attn": ATTN_INPUT,
    "down_proj-input": DOWN_PROJ_INPUT, "down_proj": DOWN_PROJ_INPUT, "down": DOWN_PROJ_INPUT,
}
BEFORE_KINDS = ("original", "fused")
RANDOM_GROUPS = ("random orthogonal", "random Hadamard")
PAPER_MIN_SEEDS = 10


# --------------------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------------------


def kurtosis(x: torch.Tensor) -> float:
    """Pearson kurtosis (3 for a Gaussian) of all entries of ``x``, computed in float64."""
    values = x.detach().reshape(-1).to(torch.float64)
    if values.numel() < 2:
        raise ValueError("kurtosis needs at least two values")
    centred = values - values.mean()
    m2 = centred.pow(2).mean()
    if m2 == 0:
        raise ValueError("kurtosis of a constant tensor is undefined")
    return float(centred.pow(4).mean() / m2.pow(2))


def _sqnr_from_sums(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_db(x: torch.Tensor, x_quantized: torch.Tensor) -> float:
    """``10 log10(||x||^2 / ||x - Q(x)||^2)`` in dB (float64 sums); +inf when the quantization is exact."""
    x64 = x.detach().to(torch.float64)
    noise = (x64 - x_quantized.detach().to(torch.float64)).pow(2).sum().item()
    return _sqnr_from_sums(x64.pow(2).sum().item(), noise)


def channel_max_abs(x: torch.Tensor) -> torch.Tensor:
    """Max |x| of every channel (last dimension) over all tokens: shape ``[channels]``, float32."""
    return x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()


def _outlier_summary(x: torch.Tensor) -> dict[str, Any]:
    per_channel = channel_max_abs(x)
    top = torch.topk(per_channel, k=min(5, per_channel.numel()))
    median = per_channel.median().item()
    return {
        "kurtosis": kurtosis(x),
        "max_abs": per_channel.max().item(),
        "median_channel_max_abs": median,
        "max_over_median": per_channel.max().item() / median if median > 0 else math.inf,
        "std": x.detach().double().std().item(),
        "top_channels": top.indices.tolist(),
        "top_channel_max_abs": top.values.tolist(),
        "channel_max_abs": [round(v, 6) for v in per_channel.tolist()],
    }


# --------------------------------------------------------------------------------------------------------------
# Capturing layer inputs
# --------------------------------------------------------------------------------------------------------------


def resolve_module(module: str) -> str:
    """Canonical module name (``q_proj-input`` or ``down_proj-input``) from a name or alias."""
    key = module.strip().lower().replace("_input", "-input")
    if key not in _MODULE_ALIASES:
        raise ValueError(f"unknown module {module!r}: use one of {MODULES}")
    return _MODULE_ALIASES[key]


def resolve_layer(model: nn.Module, layer: int | None) -> int:
    """A decoder-layer index checked against the model (None: the middle layer; negatives count from the end)."""
    n_layers = len(decoder_layers(model))
    if layer is None:
        return n_layers // 2
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range: the model has {n_layers} decoder layers (0..{n_layers - 1})")
    return layer % n_layers


class _StopForward(Exception):
    """Raised from a hook once every wanted activation has been seen (skips the rest of the network)."""


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    for key in ("hidden_states", "x"):
        if key in kwargs:
            return kwargs[key]
    raise RuntimeError("cannot find the attention block's input among its arguments")


def _down_proj_view(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """down_proj's input as its matmul sees it: after the online Hadamard R4 if the module has one."""
    if isinstance(module, QuantLinear) and module.input_hadamard:
        if module.hadamard_fp32 and x.dtype != torch.float32:
            return hadamard_transform(x.float())
        return hadamard_transform(x)
    return x


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _run_with_taps(
    model: nn.Module,
    windows: torch.Tensor,
    callback: Callable[[int, str, torch.Tensor], bool],
    layers: Iterable[int],
    modules: Iterable[str],
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "activations",
) -> None:
    """Run ``windows`` through the decoder, calling ``callback(layer, module, x)`` on each tapped input.

    ``x`` is ``[batch, seq, channels]`` as the quantizer sees it. A callback returning True ends that batch's
    forward pass early. The hooks are prepended, so they see the input before any quantizer hook of ours.
    """
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError(f"expected windows of shape [n, seqlen] with n > 0, got {tuple(windows.shape)}")
    arch = get_architecture(model)
    blocks = decoder_layers(model)
    modules = {resolve_module(m) for m in modules}
    handles = []

    def attn_hook(index: int):
        def hook(_module, args, kwargs):
            if callback(index, ATTN_INPUT, _block_input(args, kwargs).detach()):
                raise _StopForward
            return None

        return hook

    def down_hook(index: int):
        def hook(module, args):
            if callback(index, DOWN_PROJ_INPUT, _down_proj_view(module, args[0].detach())):
                raise _StopForward
            return None

        return hook

    try:
        for index in sorted(set(layers)):
            layer = blocks[index]
            if ATTN_INPUT in modules:
                attn = layer.get_submodule(arch.attn)
                handles.append(attn.register_forward_pre_hook(attn_hook(index), with_kwargs=True, prepend=True))
            if DOWN_PROJ_INPUT in modules:
                down = getattr(layer.get_submodule(arch.mlp), arch.down_proj)
                handles.append(down.register_forward_pre_hook(down_hook(index), prepend=True))
        device = _model_device(model)
        body = model.base_model
        with torch.no_grad():
            for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress):
                try:
                    body(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()


def capture_layer_input(
    model: nn.Module,
    windows: torch.Tensor,
    layer: int | None = None,
    module: str = ATTN_INPUT,
    batch_size: int = 1,
    progress: bool = True,
) -> torch.Tensor:
    """The input of one layer's attention block or down_proj over ``windows``: ``[tokens, channels]`` float32."""
    index = resolve_layer(model, layer)
    name = resolve_module(module)
    chunks: list[torch.Tensor] = []

    def keep(_layer: int, _module: str, x: torch.Tensor) -> bool:
        chunks.append(x.reshape(-1, x.shape[-1]).float().cpu())
        return True  # nothing after this layer is needed

    _run_with_taps(model, windows, keep, [index], [name], batch_size, progress, desc=f"layer {index} {name}")
    return torch.cat(chunks)


def activation_sqnr_per_layer(
    model: nn.Module,
    windows: torch.Tensor,
    quant: QuantConfig,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Per-layer SQNR (dB) of per-token activation quantization of the attention and down_proj inputs.

    The attention input uses ``quant.act``, down_proj's input ``quant.down_proj_act`` (both per token, the
    paper's ``a_*`` flags). ``result[module]``: signal and noise summed over all tokens before the ratio is
    taken (energy-weighted: a token with a massive activation dominates it). ``result[module + " token_mean"]``:
    the mean over tokens of each token's own SQNR in dB (every token counts the same).
    """
    n_layers = len(decoder_layers(model))
    specs = {ATTN_INPUT: quant.act, DOWN_PROJ_INPUT: quant.down_proj_act}
    for name, spec in specs.items():
        if not spec.enabled:
            raise ValueError(f"activation SQNR needs a_bits < 16 (the {name} quantizer is off)")
    # Per layer: pooled signal, pooled noise, sum of per-token dB, tokens counted in that sum.
    sums = {name: [[0.0, 0.0, 0.0, 0] for _ in range(n_layers)] for name in MODULES}

    def accumulate(index: int, name: str, x: torch.Tensor) -> bool:
        x64 = x.reshape(-1, x.shape[-1]).double()
        xq = fake_quantize(x.reshape(-1, x.shape[-1]).float(), specs[name]).double()
        signal, noise = x64.pow(2).sum(-1), (x64 - xq).pow(2).sum(-1)
        entry = sums[name][index]
        entry[0] += signal.sum().item()
        entry[1] += noise.sum().item()
        counted = (noise > 0) & (signal > 0)
        entry[2] += (10 * torch.log10(signal[counted] / noise[counted])).sum().item()
        entry[3] += int(counted.sum())
        return False

    _run_with_taps(model, windows, accumulate, range(n_layers), MODULES, batch_size, progress, desc="activation SQNR")
    result = {name: [_sqnr_from_sums(e[0], e[1]) for e in sums[name]] for name in MODULES}
    for name in MODULES:
        result[f"{name} token_mean"] = [e[2] / e[3] if e[3] else math.inf for e in sums[name]]
    return result


@torch.no_grad()
def weight_sqnr_per_layer(
    model: nn.Module, quant: QuantConfig, progress: bool = True
) -> dict[str, Any]:
    """Per-layer SQNR (dB) of RTN weight quantization (per output channel, ``--w_clip`` search if asked).

    Returns ``{"layer": [...], "per_projection": {name: [...]}}``; "layer" pools the seven projections of a layer.
    """
    if not quant.weight.enabled:
        raise ValueError("weight SQNR needs w_bits < 16")
    arch = get_architecture(model)
    names = (*arch.attn_linears, *arch.mlp_linears)
    pooled: list[float] = []
    per_projection: dict[str, list[float]] = {name: [] for name in names}
    for layer in tqdm(decoder_layers(model), desc="weight SQNR", disable=not progress):
        signal_total = noise_total = 0.0
        for name in names:
            parent = layer.get_submodule(arch.attn if name in arch.attn_linears else arch.mlp)
            weight = getattr(parent, name).weight.detach().float()
            spec = weight_spec_for(name, quant, arch.down_proj)
            deq, _, _ = quantize_weight_rtn(weight, spec, clip_search=quant.w_clip)
            signal = weight.double().pow(2).sum().item()
            noise = (weight.double() - deq.double()).pow(2).sum().item()
            per_projection[name].append(_sqnr_from_sums(signal, noise))
            signal_total += signal
            noise_total += noise
        pooled.append(_sqnr_from_sums(signal_total, noise_total))
    return {"layer": pooled, "per_projection": per_projection}


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def prepare_before_after(
    model: str | nn.Module,
    rotation: RotationConfig,
    before: str = "original",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[nn.Module, nn.Module, Any]:
    """Two copies of a model: "before" (``original`` or ``fused`` norms) and "after" (``rotate_`` with ``rotation``).

    ``model`` is a name/path for :func:`spinquant.load_model` or an (unrotated, unquantized) model, which is
    deep-copied and left untouched. Returns ``(before, after, tokenizer_or_None)``.
    """
    if before not in BEFORE_KINDS:
        raise ValueError(f"before must be one of {BEFORE_KINDS}, got {before!r}")
    if not rotation.rotate:
        raise ValueError("the 'after' model needs a rotation: pass RotationConfig(rotate=True, ...)")
    tokenizer = None
    if isinstance(model, nn.Module):
        if getattr(model, "spinquant_rotation", None) is not None or getattr(model, "spinquant_quant", None):
            raise ValueError("the model passed in is already rotated or quantized: pass the original model")
        before_model, after_model = copy.deepcopy(model), copy.deepcopy(model)
    else:
        before_model, tokenizer = load_model(model, dtype=dtype, device=device)
        after_model, _ = load_model(model, dtype=dtype, device=device)
    if before == "fused":
        fuse_layer_norms(before_model)
        before_model.spinquant_norms_fused = True
    rotate_(after_model, rotation)
    return before_model.eval(), after_model.eval(), tokenizer


# --------------------------------------------------------------------------------------------------------------
# Plot helpers
# --------------------------------------------------------------------------------------------------------------


def json_path_for(png_path: str | os.PathLike) -> Path:
    """Where the numbers of a figure go: the PNG's path with a ``.json`` suffix."""
    return Path(png_path).with_suffix(".json")


def _new_figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120)


def _save(figure, path: str | os.PathLike, numbers: dict[str, Any]) -> dict[str, Any]:
    png = Path(path)
    if png.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {str(png)!r}")
    figure.tight_layout()
    atomic_write(png, lambda tmp: figure.savefig(tmp, format="png"))
    numbers = {**numbers, "png": str(png), "json": str(json_path_for(png))}
    write_json(json_path_for(png), _json_safe(numbers))
    logger.info("wrote %s and %s", png, json_path_for(png))
    return numbers


def _json_safe(value: Any) -> Any:
    """Infinite/NaN floats as strings ("inf", "-inf", "nan") so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _describe_rotation(model: nn.Module) -> str:
    rotation = getattr(model, "spinquant_rotation", None)
    if rotation is None:
        return "no rotation" + (" (norms fused)" if getattr(model, "spinquant_norms_fused", False) else "")
    if rotation.optimized_rotation_path:
        what = f"learned R1/R2 ({Path(rotation.optimized_rotation_path).name})"
    else:
        what = f"random {'Hadamard' if rotation.mode == 'hadamard' else 'orthogonal'} R1/R2 (seed {rotation.seed})"
    return what + (" + R4" if rotation.online_hadamard else "")


# --------------------------------------------------------------------------------------------------------------
# (a) outliers
# --------------------------------------------------------------------------------------------------------------


def plot_outliers(
    model_before: nn.Module,
    model_after: nn.Module,
    windows: torch.Tensor,
    path: str | os.PathLike,
    layer: int | None = None,
    module: str = ATTN_INPUT,
    labels: Sequence[str] | None = None,
    batch_size: int = 1,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Per-channel max |activation| of one layer's input, before and after rotation (two panels, shared y).

    Panel titles carry each distribution's kurtosis and largest |x|; the JSON holds both panels' per-channel
    maxima and summary statistics. ``layer`` None is the middle layer.
    """
    index = resolve_layer(model_before, layer)
    resolve_layer(model_after, index)
    name = resolve_module(module)
    if not labels:
        labels = ["before: " + _describe_rotation(model_before), "after: " + _describe_rotation(model_after)]
    panels = []
    for model, label in zip((model_before, model_after), labels):
        x = capture_layer_input(model, windows, index, name, batch_size=batch_size, progress=progress)
        panels.append({"label": label, "tokens": int(x.shape[0]), "channels": int(x.shape[1]), **_outlier_summary(x)})

    figure = _new_figure(12, 4.2)
    axes = figure.subplots(1, 2, sharey=True)
    for axis, panel in zip(axes, panels):
        values = panel["channel_max_abs"]
        axis.bar(range(len(values)), values, width=1.0, color="tab:red" if panel is panels[0] else "tab:blue")
        axis.set_title(
            f"{panel['label']}\nkurtosis {panel['kurtosis']:.1f}, max |x| {panel['max_abs']:.2f}", fontsize=9
        )
        axis.set_xlabel("channel")
        axis.set_xlim(-0.5, len(values) - 0.5)
        axis.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("max |activation| over tokens")
    what = "attention input (q/k/v)" if name == ATTN_INPUT else "down_proj input"
    figure.suptitle(f"layer {index} {what}: {panels[0]['tokens']} tokens", fontsize=10)
    numbers = {
        "kind": "outliers",
        "layer": index,
        "module": name,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "kurtosis_definition": "Pearson (non-excess), all entries; a Gaussian has 3",
        "before": panels[0],
        "after": panels[1],
        **(extra or {}),
    }
    return _save(figure, path, numbers)


# --------------------------------------------------------------------------------------------------------------
# (b) SQNR
# --------------------------------------------------------------------------------------------------------------


def _spec_text(spec: QuantSpec, what: str) -> str:
    group = f", groups of {spec.groupsize}" if spec.groupsize > 0 else ""
    clip = f", clip {spec.clip_ratio:g}" if spec.clip_ratio != 1.0 else ""
    return f"{spec.bits}-bit {'asym' if spec.asym else 'sym'} {what}{group}{clip}"


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def plot_sqnr(
    model_before: nn.Module,
    model_after: nn.Module,
    windows: torch.Tensor,
    path: str | os.PathLike,
    quant: QuantConfig | None = None,
    labels: Sequence[str] = ("no rotation", "rotated"),
    batch_size: int = 1,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
    act_reduce: str = "pooled",
) -> dict[str, Any]:
    """Per-layer quantization SQNR (dB) with and without rotation: activations (left) and RTN weights (right).

    ``quant`` (default ``QuantConfig(w_bits=4, a_bits=4, a_asym=True)``) gives bits, symmetry, groups and clip
    ratio of both; ``w_clip`` switches the weight clip search on. Models must not be quantized yet.
    ``act_reduce``: plot the activations' ``pooled`` SQNR or their ``token_mean`` (both are in the JSON; see
    :func:`activation_sqnr_per_layer`).
    """
    if act_reduce not in ("pooled", "token_mean"):
        raise ValueError(f"act_reduce must be 'pooled' or 'token_mean', got {act_reduce!r}")
    for model in (model_before, model_after):
        if getattr(model, "spinquant_quant", None) is not None:
            raise ValueError("plot_sqnr needs unquantized models (quantize_ has already been applied to one)")
    quant = quant or QuantConfig(w_bits=4, a_bits=4, a_asym=True)
    suffix = "" if act_reduce == "pooled" else " token_mean"
    results = []
    for model, label in zip((model_before, model_after), labels):
        acts = activation_sqnr_per_layer(model, windows, quant, batch_size=batch_size, progress=progress)
        weights = weight_sqnr_per_layer(model, quant, progress=progress)
        results.append(
            {
                "label": label,
                "rotation": _describe_rotation(model),
                "activation": acts,
                "weight": weights,
                "mean": {
                    ATTN_INPUT: _mean(acts[ATTN_INPUT]),
                    DOWN_PROJ_INPUT: _mean(acts[DOWN_PROJ_INPUT]),
                    f"{ATTN_INPUT} token_mean": _mean(acts[f"{ATTN_INPUT} token_mean"]),
                    f"{DOWN_PROJ_INPUT} token_mean": _mean(acts[f"{DOWN_PROJ_INPUT} token_mean"]),
                    "weight": _mean(weights["layer"]),
                },
            }
        )

    figure = _new_figure(12, 4.5)
    act_axis, weight_axis = figure.subplots(1, 2)
    colors = ("tab:red", "tab:blue")
    for result, color in zip(results, colors):
        for name, style in ((ATTN_INPUT, "-"), (DOWN_PROJ_INPUT, "--")):
            values = result["activation"][name + suffix]
            act_axis.plot(
                range(len(values)), values, style, color=color, marker=".",
                label=f"{result['label']}, {name} (mean {result['mean'][name + suffix]:.1f} dB)",
            )
        values = result["weight"]["layer"]
        weight_axis.plot(
            range(len(values)), values, "-", color=color, marker=".",
            label=f"{result['label']} (mean {result['mean']['weight']:.1f} dB)",
        )
    reduce_text = "pooled over tokens" if act_reduce == "pooled" else "mean of per-token SQNR"
    act_axis.set_title(f"activations: {_spec_text(quant.act, 'per token')} ({reduce_text})", fontsize=10)
    weight_axis.set_title(
        f"weights: {_spec_text(quant.weight, 'RTN per channel')}{', clip search' if quant.w_clip else ''}",
        fontsize=10,
    )
    for axis in (act_axis, weight_axis):
        axis.set_xlabel("layer")
        axis.set_ylabel("SQNR (dB)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    numbers = {
        "kind": "sqnr",
        "sqnr_definition": "10*log10(sum x^2 / sum (x - Q(x))^2), pooled over tokens (activations) or weights; "
        "'<module> token_mean': the mean over tokens of each token's SQNR in dB",
        "act_reduce_plotted": act_reduce,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "quant": {
            "activation": _spec_text(quant.act, "per token"),
            "down_proj_activation": _spec_text(quant.down_proj_act, "per token"),
            "weight": _spec_text(quant.weight, "RTN per channel"),
            "w_clip": quant.w_clip,
        },
        "before": results[0],
        "after": results[1],
        **(extra or {}),
    }
    return _save(figure, path, numbers)


# --------------------------------------------------------------------------------------------------------------
# (c) perplexity distribution
# --------------------------------------------------------------------------------------------------------------


def _expand_sources(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files: list[Path] = []
    for source in sources:
        text = str(source)
        path = Path(text).expanduser()
        if path.is_dir():
            files.extend(sorted(path.rglob("*.json")))
        elif path.is_file():
            files.append(path)
        else:
            matched = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
            if not matched and not glob.has_magic(text):
                raise FileNotFoundError(f"result path {text!r} does not exist")
            files.extend(p for p in matched if p.is_file())
    unique = list(dict.fromkeys(p.resolve() for p in files))
    if not unique:
        raise FileNotFoundError(f"no JSON files matched {[str(s) for s in sources]}")
    return unique


def load_ppl_results(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Result JSONs (files, directories searched recursively, or globs) that carry a ``wiki2_ppl``.

    Each returned dict is the file's content plus ``_file``. Files without ``wiki2_ppl`` (other outputs in
    the same folder) are skipped with a log line; a folder with no results at all is an error.
    """
    results = []
    skipped = []
    for file in _expand_sources(sources):
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read result file {str(file)!r}: {err}") from err
        if not isinstance(data, dict) or "wiki2_ppl" not in data:
            skipped.append(file)
            continue
        data["_file"] = str(file)
        results.append(data)
    if skipped:
        logger.info("skipped %d JSON files without wiki2_ppl (e.g. %s)", len(skipped), skipped[0])
    if not results:
        raise ValueError(f"none of the {len(skipped)} JSON files found has a 'wiki2_ppl' entry")
    return results


def _lookup(result: dict[str, Any], key: str) -> Any:
    """A dotted key in the result, then in its ``config``; None if absent."""
    for root in (result, result.get("config") or {}):
        value: Any = root
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                value = None
                break
            value = value[part]
        if value is not None:
            return value
    return None


def _auto_group(result: dict[str, Any]) -> str:
    if result.get("label"):
        return str(result["label"])
    config = result.get("config") or {}
    if not config.get("rotate", bool(config.get("optimized_rotation_path"))):
        return "no rotation"
    if config.get("optimized_rotation_path"):
        return "learned"
    return "random orthogonal" if config.get("rotate_mode") == "random" else "random Hadamard"


def group_ppl_results(results: Sequence[dict[str, Any]], group_by: str = "auto") -> dict[str, list[dict[str, Any]]]:
    """Results per group, in a stable order (random orthogonal, random Hadamard, learned, then the rest).

    ``group_by``: ``auto`` (the ``label`` key if present, else no rotation / random orthogonal / random Hadamard /
    learned from the config), ``label`` (the ``label`` key, required), or any key of the result or its
    ``config`` (dotted for nesting, e.g. ``rotate_mode`` or ``resolved.rotation.mode``).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        if group_by == "auto":
            name = _auto_group(result)
        elif group_by == "label":
            if not result.get("label"):
                raise ValueError(f"--group_by label: {result.get('_file', 'a result')} has no 'label' key")
            name = str(result["label"])
        else:
            value = _lookup(result, group_by)
            if value is None:
                raise ValueError(f"--group_by {group_by}: {result.get('_file', 'a result')} has no such key")
            name = f"{group_by}={value}"
        groups.setdefault(name, []).append(result)
    order = {name: i for i, name in enumerate((*RANDOM_GROUPS, "learned"))}
    return dict(sorted(groups.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))


def _seed_of(result: dict[str, Any]) -> Any:
    config = result.get("config") or {}
    rotation_seed = config.get("rotation_seed")
    return rotation_seed if isinstance(rotation_seed, int) and rotation_seed >= 0 else config.get("seed")


def ppl_group_stats(values: Sequence[float]) -> dict[str, Any]:
    """n, min, median, max, mean and sample standard deviation (ddof 1; None below two values) of the finite
    values; ``n_nonfinite`` counts diverged runs (inf/NaN), which are left out of the statistics."""
    finite = sorted(float(v) for v in values if math.isfinite(float(v)))
    stats: dict[str, Any] = {"n": len(finite), "n_nonfinite": len(values) - len(finite)}
    if not finite:
        return {**stats, "min": None, "median": None, "max": None, "mean": None, "std": None}
    tensor = torch.tensor(finite, dtype=torch.float64)
    stats.update(
        min=finite[0],
        median=float(tensor.quantile(0.5)),
        max=finite[-1],
        mean=float(tensor.mean()),
        std=float(tensor.std(unbiased=True)) if len(finite) > 1 else None,
    )
    return stats


def _ppl_value(result: dict[str, Any]) -> float:
    value = result["wiki2_ppl"]
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{result.get('_file', 'a result')}: wiki2_ppl {value!r} is not a number") from None


def _bits_tag(config: dict[str, Any]) -> str:
    bits = [config.get(f"{p}_bits", 16) for p in ("w", "a", "k", "v")]
    if bits[2] == bits[3]:
        return f"W{bits[0]}A{bits[1]}KV{bits[2]}"
    return f"W{bits[0]}A{bits[1]}K{bits[2]}V{bits[3]}"


def plot_ppl_distribution(
    sources: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[dict[str, Any]],
    path: str | os.PathLike,
    group_by: str = "auto",
    log_y: bool | None = None,
    title: str = "",
) -> dict[str, Any]:
    """The WikiText-2 perplexity spread per group (strip plot over a box plot), with per-group statistics.

    ``sources``: result files/folders/globs, or already-loaded result dicts. ``log_y`` None switches to a log
    axis when the largest finite ppl is more than 5x the smallest. Warns when a random group has fewer than
    the paper's 10 seeds, or when the results mix bit widths.
    """
    if isinstance(sources, (list, tuple)) and sources and all(isinstance(s, dict) for s in sources):
        results = [s for s in sources if "wiki2_ppl" in s]
        if not results:
            raise ValueError("none of the results passed has a 'wiki2_ppl' entry")
    else:
        results = load_ppl_results(sources)  # type: ignore[arg-type]
    groups = group_ppl_results(results, group_by)
    warnings: list[str] = []
    tags = sorted({_bits_tag(r.get("config") or {}) for r in results})
    if len(tags) > 1:
        warnings.append(f"results mix quantization settings: {', '.join(tags)}")
    numbers_groups: dict[str, Any] = {}
    for name, members in groups.items():
        values = [_ppl_value(r) for r in members]
        stats = ppl_group_stats(values)
        if name in RANDOM_GROUPS and len(members) < PAPER_MIN_SEEDS:
            warnings.append(f"{name}: {len(members)} runs, fewer than the paper's {PAPER_MIN_SEEDS} seeds")
        numbers_groups[name] = {
            **stats,
            "runs": [
                {"ppl": v, "seed": _seed_of(r), "file": r.get("_file")} for v, r in zip(values, members)
            ],
        }
    for line in warnings:
        logger.warning("%s", line)

    finite_all = [v for g in numbers_groups.values() for v in (run["ppl"] for run in g["runs"]) if math.isfinite(v)]
    if not finite_all:
        raise ValueError("every result has a non-finite wiki2_ppl: nothing to plot")
    if log_y is None:
        log_y = max(finite_all) > 5 * min(finite_all)

    figure = _new_figure(max(5.0, 1.8 * len(groups) + 2), 4.5)
    axis = figure.add_subplot(1, 1, 1)
    generator = torch.Generator().manual_seed(0)
    names = list(numbers_groups)
    box_data, box_positions = [], []
    for position, name in enumerate(names, start=1):
        values = [run["ppl"] for run in numbers_groups[name]["runs"] if math.isfinite(run["ppl"])]
        if not values:
            continue
        if len(values) > 1:
            box_data.append(values)
            box_positions.append(position)
        jitter = (torch.rand(len(values), generator=generator) - 0.5) * 0.3
        axis.scatter([position + j for j in jitter.tolist()], values, s=18, alpha=0.8, zorder=3)
    if box_data:
        axis.boxplot(box_data, positions=box_positions, widths=0.5, showfliers=False, zorder=2)
    axis.set_xticks(range(1, len(names) + 1))
    axis.set_xticklabels(
        [f"{n}\n(n={numbers_groups[n]['n']}"
         + (f", {numbers_groups[n]['n_nonfinite']} diverged" if numbers_groups[n]["n_nonfinite"] else "") + ")"
         for n in names],
        fontsize=8,
    )
    axis.set_xlim(0.4, len(names) + 0.6)
    if log_y:
        axis.set_yscale("log")
    axis.set_ylabel("WikiText-2 perplexity" + (" (log scale)" if log_y else ""))
    axis.grid(alpha=0.3, axis="y", which="both")
    axis.set_title(title or f"{' / '.join(tags)} perplexity per rotation", fontsize=10)
    numbers = {
        "kind": "ppl-distribution",
        "group_by": group_by,
        "settings": tags,
        "log_y": bool(log_y),
        "std_definition": "sample standard deviation (ddof=1) of the finite perplexities",
        "groups": numbers_groups,
        "warnings": warnings,
    }
    return _save(figure, path, numbers)


def format_ppl_table(numbers: dict[str, Any]) -> str:
    """The per-group statistics as a small text table."""

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [f"{'group':<24} {'n':>3} {'min':>10} {'median':>10} {'max':>10} {'std':>10}"]
    for name, g in numbers["groups"].items():
        cells = " ".join(f"{fmt(g[key]):>10}" for key in ("min", "median", "max", "std"))
        lines.append(f"{name:<24} {g['n']:>3} {cells}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# (d) loss curves
# --------------------------------------------------------------------------------------------------------------


def read_train_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``train_log.jsonl`` (a folder is taken to contain one)."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "train_log.jsonl"
    if not file.is_file():
        raise FileNotFoundError(f"training log {str(file)!r} does not exist")
    records = []
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{file}:{number}: not a JSON line ({err})") from err
    return records


def plot_loss_curves(
    logs: Sequence[str | os.PathLike | Sequence[dict[str, Any]]],
    path: str | os.PathLike,
    labels: Sequence[str] | None = None,
    title: str = "",
) -> dict[str, Any]:
    """Loss against step from one or more training logs (paths or record lists), overlaid with labels.

    One log is drawn by :func:`train_utils.plots.plot_loss_curve` (loss plus the learning rate); several are
    overlaid on one axis. The JSON holds each curve's steps and losses.
    """
    if not logs:
        raise ValueError("no training logs given")
    if labels is not None and len(labels) != len(logs):
        raise ValueError(f"{len(labels)} labels for {len(logs)} logs")
    curves = []
    for index, log in enumerate(logs):
        records = read_train_log(log) if isinstance(log, (str, os.PathLike)) else list(log)
        rows = [r for r in records if "step" in r and "loss" in r]
        if not rows:
            where = log if isinstance(log, (str, os.PathLike)) else f"#{index}"
            raise ValueError(f"training log {where}: no records with a step and a loss")
        if labels:
            label = labels[index]
        elif isinstance(log, (str, os.PathLike)):
            folder = Path(log) if Path(log).is_dir() else Path(log).parent
            label = folder.name or Path(log).stem
        else:
            label = f"run {index}"
        curves.append(
            {
                "label": label,
                "source": str(log) if isinstance(log, (str, os.PathLike)) else None,
                "steps": [r["step"] for r in rows],
                "loss": [r["loss"] for r in rows],
                "lr": [r.get("lr") for r in rows],
                "first_loss": rows[0]["loss"],
                "last_loss": rows[-1]["loss"],
                "min_loss": min(r["loss"] for r in rows),
            }
        )
    numbers = {"kind": "loss-curve", "curves": curves}
    png = Path(path)
    if png.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {str(png)!r}")
    if len(curves) == 1:
        from train_utils.plots import plot_loss_curve

        curve = curves[0]
        records = [
            {"step": step, "loss": loss, **({"lr": lr} if lr is not None else {})}
            for step, loss, lr in zip(curve["steps"], curve["loss"], curve["lr"])
        ]
        plot_loss_curve(records, png, title=title or curve["label"])
        numbers = {**numbers, "png": str(png), "json": str(json_path_for(png))}
        write_json(json_path_for(png), _json_safe(numbers))
        return numbers
    figure = _new_figure(7, 4)
    axis = figure.add_subplot(1, 1, 1)
    for curve in curves:
        axis.plot(curve["steps"], curve["loss"], label=f"{curve['label']} (last {curve['last_loss']:.3f})",
                  marker="." if len(curve["steps"]) < 50 else None)
    axis.set_xlabel("step")
    axis.set_ylabel("quantized-network loss (cross-entropy)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(title or "SpinQuant rotation learning")
    return _save(figure, png, numbers)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, model folder, .gguf file or hub id")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--data_dir", default=None, help="local WikiText-2 mirror (default: $SPINQUANT_DATA_DIR or the hub)"
    )
    parser.add_argument("--split", default="test", help="WikiText-2 split the windows come from")
    parser.add_argument("--nsamples", type=int, default=4, help="windows (the first N of the split)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    parser.add_argument("--batch_size", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--rotate_mode", default="hadamard", choices=("hadamard", "random"), help="random R1/R2 kind")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random rotation")
    parser.add_argument(
        "--optimized_rotation_path", default=None, help="R.bin with learned R1/R2 (overrides --rotate_mode)"
    )
    parser.add_argument("--online_hadamard", action=argparse.BooleanOptionalAction, default=True,
                        help="R4 on down_proj's input (--no-online_hadamard: the 'no_had' variant)")
    parser.add_argument("--before", default="original", choices=BEFORE_KINDS,
                        help="the no-rotation model: original (what the baseline quantizes) or norm-fused")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval_utils.figures", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)

    outliers = sub.add_parser("outliers", help="per-channel max |activation| before/after rotation")
    _add_model_args(outliers)
    outliers.add_argument("--layer", type=int, default=None, help="decoder layer (default: the middle one)")
    outliers.add_argument("--module", default=ATTN_INPUT, help=f"which input: {' or '.join(MODULES)}")
    outliers.add_argument("--out", required=True, help="PNG path (the numbers go next to it as .json)")

    sqnr = sub.add_parser("sqnr", help="per-layer quantization SQNR with and without rotation")
    _add_model_args(sqnr)
    sqnr.add_argument("--a_bits", type=int, default=4)
    sqnr.add_argument("--a_asym", action=argparse.BooleanOptionalAction, default=True)
    sqnr.add_argument("--a_groupsize", type=int, default=-1)
    sqnr.add_argument("--a_clip_ratio", type=float, default=1.0)
    sqnr.add_argument("--w_bits", type=int, default=4)
    sqnr.add_argument("--w_asym", action=argparse.BooleanOptionalAction, default=False)
    sqnr.add_argument("--w_groupsize", type=int, default=-1)
    sqnr.add_argument("--w_clip", action=argparse.BooleanOptionalAction, default=False, help="the paper's clip search")
    sqnr.add_argument("--act_reduce", default="pooled", choices=("pooled", "token_mean"),
                      help="activation SQNR plotted: pooled over tokens, or the mean of per-token SQNR (both saved)")
    sqnr.add_argument("--out", required=True)

    ppl = sub.add_parser("ppl-distribution", help="perplexity spread per rotation group from result JSONs")
    ppl.add_argument("results", nargs="+", help="result JSON files, folders (searched recursively) or globs")
    ppl.add_argument("--group_by", default="auto", help="auto, label, or a result/config key such as rotate_mode")
    ppl.add_argument("--log_y", default="auto", choices=("auto", "on", "off"))
    ppl.add_argument("--title", default="")
    ppl.add_argument("--out", required=True)

    loss = sub.add_parser("loss-curve", help="training loss against step, several logs overlaid")
    loss.add_argument("logs", nargs="+", help="train_log.jsonl files (or folders holding one)")
    loss.add_argument("--labels", nargs="+", default=None)
    loss.add_argument("--title", default="")
    loss.add_argument("--out", required=True)
    return parser


def _models_and_windows(args: argparse.Namespace) -> tuple[nn.Module, nn.Module, torch.Tensor, dict[str, Any]]:
    from utils.data import get_eval_windows

    if args.nsamples < 1 or args.seqlen < 2:
        raise ValueError("--nsamples must be >= 1 and --seqlen >= 2")
    rotation = RotationConfig(
        rotate=True, mode=args.rotate_mode, seed=args.seed, optimized_rotation_path=args.optimized_rotation_path,
        online_hadamard=args.online_hadamard,
    )
    before, after, tokenizer = prepare_before_after(
        args.model, rotation, before=args.before, dtype=_DTYPES[args.dtype], device=args.device
    )
    windows = get_eval_windows(tokenizer, args.seqlen, split=args.split, data_dir=args.data_dir)
    if windows.shape[0] < args.nsamples:
        logger.warning("WikiText-2 %s has only %d windows of %d tokens", args.split, windows.shape[0], args.seqlen)
    extra = {
        "model": args.model,
        "split": args.split,
        "before_kind": args.before,
        "rotation": {
            "mode": args.rotate_mode,
            "seed": args.seed,
            "optimized_rotation_path": args.optimized_rotation_path,
            "online_hadamard": args.online_hadamard,
        },
    }
    return before, after, windows[: args.nsamples], extra


def _print_summary(numbers: dict[str, Any]) -> None:
    kind = numbers["kind"]
    if kind == "outliers":
        for side in ("before", "after"):
            panel = numbers[side]
            print(f"{panel['label']}: kurtosis {panel['kurtosis']:.2f}, max |x| {panel['max_abs']:.3f}, "
                  f"max/median channel {panel['max_over_median']:.1f}")
    elif kind == "sqnr":
        for side in ("before", "after"):
            mean = numbers[side]["mean"]
            print(f"{numbers[side]['label']}: mean over layers of the SQNR: attention input {mean[ATTN_INPUT]:.2f} dB "
                  f"(per-token mean {mean[ATTN_INPUT + ' token_mean']:.2f}), down_proj input "
                  f"{mean[DOWN_PROJ_INPUT]:.2f} dB (per-token mean {mean[DOWN_PROJ_INPUT + ' token_mean']:.2f}), "
                  f"weights {mean['weight']:.2f} dB")
    elif kind == "ppl-distribution":
        print(format_ppl_table(numbers))
        for line in numbers["warnings"]:
            print(f"warning: {line}")
    elif kind == "loss-curve":
        for curve in numbers["curves"]:
            steps, first, last = len(curve["steps"]), curve["first_loss"], curve["last_loss"]
            print(f"{curve['label']}: {steps} steps, loss {first:.4f} -> {last:.4f}")
    print(f"wrote {numbers['png']} and {numbers['json']}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Make the figure the parsed ``args`` ask for; returns its numbers."""
    progress = not getattr(args, "no_progress", False)
    if args.kind == "outliers":
        module = resolve_module(args.module)  # fail before loading anything
        before, after, windows, extra = _models_and_windows(args)
        return plot_outliers(before, after, windows, args.out, layer=args.layer, module=module,
                             batch_size=args.batch_size, progress=progress, extra=extra)
    if args.kind == "sqnr":
        quant = QuantConfig(
            w_bits=args.w_bits, w_asym=args.w_asym, w_groupsize=args.w_groupsize, w_clip=args.w_clip,
            a_bits=args.a_bits, a_asym=args.a_asym, a_groupsize=args.a_groupsize, a_clip_ratio=args.a_clip_ratio,
        )
        if not (quant.act.enabled and quant.weight.enabled):  # also validates bits and clip ratio
            raise ValueError("the SQNR figure needs --a_bits < 16 and --w_bits < 16")
        before, after, windows, extra = _models_and_windows(args)
        return plot_sqnr(before, after, windows, args.out, quant=quant, batch_size=args.batch_size,
                         progress=progress, extra=extra, act_reduce=args.act_reduce)
    if args.kind == "ppl-distribution":
        log_y = {"auto": None, "on": True, "off": False}[args.log_y]
        return plot_ppl_distribution(args.results, args.out, group_by=args.group_by, log_y=log_y, title=args.title)
    if args.kind == "loss-curve":
        return plot_loss_curves(args.logs, args.out, labels=args.labels, title=args.title)
    raise ValueError(f"unknown figure kind {args.kind!r}")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        numbers = run(args)
    except (FileNotFoundError, ValueError, ImportError) as err:
        logger.error("%s", err)
        return 2
    _print_summary(numbers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
