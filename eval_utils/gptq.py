"""GPTQ weight quantization (Frantar et al., 2023), run layer by layer as the SpinQuant paper's pipeline runs it.

GPTQ quantizes a linear layer's weight one input column at a time and, after each column, moves the rounding
error onto the columns not yet quantized so that the layer's *output* on calibration data changes as little as
possible. The objective is ``||X W^T - X Q^T||^2`` with ``X`` the inputs the layer really sees; its Hessian is
``H = 2 X^T X``, and the optimal update of the remaining columns after quantizing column ``j`` is
``-(w_j - q_j) / [H^-1]_jj * [H^-1]_j,j:``. Following the paper:

* ``H^-1`` comes from a Cholesky factorisation (upper factor of the inverse of the dampened Hessian,
  ``H + percdamp * mean(diag H) * I``), so the sequence of rank-one updates is numerically stable;
* updates are applied lazily in blocks of 128 columns (the result is the same, the work is matrix-matrix);
* ``act_order`` visits columns by decreasing ``diag(H)`` (the most important inputs first);
* a column whose input is always zero ("dead") is set to zero.

How the quantization grid is chosen (the paper's code combines GPTQ with the RTN quantizer this way): the scale
and zero of a row (per-channel) or of a group of ``--w_groupsize`` input columns are found by
:class:`utils.quant.WeightQuantizer` -- with the ``--w_clip`` search when asked -- on the weights *as updated by
GPTQ so far* at the moment the group's first column is reached. Per-channel, that is the original weight.
With ``--act_order`` and groups, the groups are "static": each group's parameters are found up front on the
original weights of its columns in their natural order, so a group is still a contiguous run of input columns
that a packed int4 kernel (or ExecuTorch) can use; columns are then visited in act-order, each quantized on its
own group's grid.

Layer by layer: the inputs of the first decoder layer are captured once (a pre-hook that stops the forward);
each layer is then moved to the GPU on its own, its linears are quantized in the paper's sequential order
(q/k/v together, then o_proj, then gate/up, then down_proj, each Hessian taken from the inputs produced by the
already-quantized parts), and the quantized layer's outputs become the next layer's inputs.

Where the Hessian input is taken: from :meth:`spinquant.model.QuantLinear.matmul_input`, i.e. what the matmul
multiplies, *after* the online Hadamard R4 on down_proj's input. The weight GPTQ quantizes is the one merged
with that Hadamard, so its Hessian must be that of the transformed input; the raw module input would give the
Hessian of a different (unrotated) problem. Activation, K and V quantizers are switched off while statistics are
gathered, as in the paper (activations are quantized only at evaluation), and switched back on afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from spinquant.config import QuantConfig
from spinquant.model import QuantLinear, decoder_layers, get_architecture, wrap_linears
from spinquant.quantize import _store_weight_params, weight_spec_for
from utils.quant import QuantSpec, WeightQuantizer

logger = logging.getLogger(__name__)

__all__ = [
    "GPTQConfig",
    "GPTQResult",
    "HessianAccumulator",
    "gptq_config_from_args",
    "gptq_quantize_weight",
    "gptq_quantize_model",
    "activation_quant_off",
]


@dataclass(frozen=True)
class GPTQConfig:
    """How GPTQ runs (what it quantizes to comes from :class:`~spinquant.config.QuantConfig`).

    ``batch_size`` is the number of calibration windows per layer forward: it changes memory and speed only.
    """

    nsamples: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    blocksize: int = 128
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.nsamples < 1:
            raise ValueError(f"--nsamples must be at least 1, got {self.nsamples}")
        if not (self.percdamp >= 0 and math.isfinite(self.percdamp)):
            raise ValueError(f"--percdamp must be a non-negative number, got {self.percdamp}")
        if self.blocksize < 1 or self.batch_size < 1:
            raise ValueError(f"GPTQ blocksize and batch_size must be positive, got {self.blocksize}, {self.batch_size}")


def gptq_config_from_args(args) -> GPTQConfig:
    return GPTQConfig(nsamples=args.nsamples, percdamp=args.percdamp, act_order=bool(args.act_order))


# --------------------------------------------------------------------------------------------------------------
# One weight matrix
# --------------------------------------------------------------------------------------------------------------


class HessianAccumulator:
    """Running ``H = 2/N * sum_t x_t x_t^T`` over the N token rows seen, in float32.

    The 2/N scale does not change GPTQ's result (dampening is relative, and the updates use ratios of ``H^-1``
    entries); averaging only keeps the numbers in range.
    """

    def __init__(self, columns: int, device: torch.device | str) -> None:
        self.columns = columns
        self.sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, self.columns).to(self.sum.device, torch.float32)
        self.sum.addmm_(rows.T, rows)
        self.rows += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise RuntimeError("no inputs were recorded for this layer")
        return self.sum * (2.0 / self.rows)


@dataclass
class GPTQResult:
    """The quantized weight (dequantized, in the input weight's dtype), its grid and GPTQ's own loss.

    ``scale``/``zero`` are ``[out, n_groups]`` float32 in the natural column order (n_groups = 1 per-channel),
    exactly what RTN stores, so ``weight == scale * (q - zero)`` with integer ``q``.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    loss: float


def _inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1`` with ``damp = percdamp * mean(diag H)``."""
    h = hessian.clone()
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += percdamp * torch.mean(torch.diag(h))
    try:
        lower = torch.linalg.cholesky(h)
        inverse = torch.cholesky_inverse(lower)
        return torch.linalg.cholesky(inverse, upper=True)
    except torch.linalg.LinAlgError as err:
        raise ValueError(
            f"GPTQ: the Hessian is not positive definite after dampening with --percdamp {percdamp}; "
            "increase --percdamp (e.g. 0.1) or use more calibration data (--nsamples)"
        ) from err


def _group_size(spec: QuantSpec, columns: int) -> int:
    """The effective group size (0: one group per row); errors name the flag."""
    if spec.groupsize <= 0 or spec.groupsize == columns:
        return 0
    if columns % spec.groupsize:
        raise ValueError(f"--w_groupsize {spec.groupsize} does not divide the input dimension {columns}")
    return spec.groupsize


@torch.no_grad()
def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    clip_search: bool = False,
    percdamp: float = 0.01,
    act_order: bool = False,
    blocksize: int = 128,
) -> GPTQResult:
    """GPTQ one ``[out, in]`` weight against the input Hessian ``[in, in]`` (see the module docstring)."""
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight {tuple(weight.shape)} and Hessian {tuple(hessian.shape)} do not match")
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(work_dtype).clone()
    h = hessian.detach().to(w.device, work_dtype).clone()
    rows, columns = w.shape
    groupsize = _group_size(spec, columns)
    n_groups = columns // groupsize if groupsize else 1

    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    scales = torch.empty(rows, n_groups, dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)

    def fitted(block: torch.Tensor, group: int) -> WeightQuantizer:
        quantizer = WeightQuantizer(spec, clip_search=clip_search)
        quantizer.find_params(block)
        scales[:, group] = quantizer.scale[:, 0].float()
        zeros[:, group] = quantizer.zero[:, 0].float()
        return quantizer

    static_groups: list[WeightQuantizer] = []
    quantizer: WeightQuantizer | None = None
    if not groupsize:
        quantizer = fitted(w, 0)
    elif act_order:
        static_groups = [fitted(w[:, g * groupsize : (g + 1) * groupsize], g) for g in range(n_groups)]

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, percdamp)
    del h

    # Groups found on the fly start at a block boundary and end inside the block, so the group's weights read
    # at its first column carry every update from the columns before it.
    dynamic_groups = bool(groupsize) and not act_order
    if dynamic_groups:
        blocksize = groupsize * max(1, blocksize // groupsize)

    q_all = torch.zeros_like(w)
    loss = torch.zeros(rows, dtype=work_dtype, device=w.device)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            if dynamic_groups and column % groupsize == 0:
                quantizer = fitted(w1[:, i : i + groupsize], column // groupsize)
            elif static_groups:
                quantizer = static_groups[int(perm[column]) // groupsize]
            col = w1[:, i]
            q = quantizer.quantize(col.unsqueeze(1)).squeeze(1).to(work_dtype)
            q1[:, i] = q
            err = (col - q) / hinv1[i, i]
            w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1)
            err1[:, i] = err
        q_all[:, i1:i2] = q1
        loss += err1.square().sum(dim=1) / 2
        w[:, i2:].sub_(err1 @ hinv[i1:i2, i2:])

    if perm is not None:
        q_all = q_all[:, torch.argsort(perm)]
    if not torch.isfinite(q_all).all():
        raise ValueError("GPTQ produced non-finite weights; increase --percdamp")
    return GPTQResult(q_all.to(weight.dtype), scales, zeros, float(loss.sum()))


# --------------------------------------------------------------------------------------------------------------
# The whole model, layer by layer
# --------------------------------------------------------------------------------------------------------------


_QUANTIZER_OFF = {"input_quantizer": None, "output_quantizer": None, "k_quant_spec": None, "qk_hadamard": False}


@contextlib.contextmanager
def activation_quant_off(model: nn.Module) -> Iterator[None]:
    """Switch the activation, V and K quantizers (and R3) off in every decoder layer; restore them on exit.

    R3 multiplies Q and K by the same Hadamard, so it changes no layer output; it is off only because the
    paper adds it after GPTQ.
    """
    saved: list[tuple[nn.Module, str, object]] = []
    for module in list(decoder_layers(model).modules()):
        for attr, off in _QUANTIZER_OFF.items():
            if attr in module.__dict__ or attr in module._modules:
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, off)
    try:
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


class _Stop(Exception):
    """Raised from a hook to end a forward early once what it was run for has been recorded."""


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _on_device(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    homes = [_module_device(m) for m in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(modules, homes):
            module.to(home)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _capture_layer_inputs(
    model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int
) -> tuple[torch.Tensor, dict[int, dict]]:
    """Run the embeddings on every window and keep what the first decoder layer receives.

    Returns the hidden states ``[n, seqlen, hidden]`` on ``device`` and the layer's keyword arguments (attention
    mask, position embeddings, ...) per batch size, as the model computed them.
    """
    layers = decoder_layers(model)
    base = model.get_submodule(get_architecture(model).layers.rsplit(".", 1)[0])
    around_layers = [child for child in base.children() if child is not layers]
    inputs: torch.Tensor | None = None
    kwargs_by_size: dict[int, dict] = {}
    caught: dict = {}

    def catch(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        caught["hidden"] = hidden
        caught["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with _on_device(around_layers, device):
            for part in _chunks(windows.shape[0], batch_size):
                with contextlib.suppress(_Stop):
                    base(input_ids=windows[part].to(device), use_cache=False)
                if "hidden" not in caught:
                    raise RuntimeError("the first decoder layer was never called")
                hidden = caught.pop("hidden")
                if inputs is None:
                    inputs = torch.empty(
                        (windows.shape[0], *hidden.shape[1:]), dtype=hidden.dtype, device=device
                    )
                inputs[part] = hidden
                kwargs_by_size.setdefault(part.stop - part.start, caught.pop("kwargs"))
    finally:
        handle.remove()
    return inputs, kwargs_by_size


def _run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _sequential_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """The paper's order inside a decoder layer: q/k/v, o_proj, gate/up, down_proj (names relative to the layer)."""
    arch = get_architecture(model)
    attn = lambda name: f"{arch.attn}.{name}"  # noqa: E731
    mlp = lambda name: f"{arch.mlp}.{name}"  # noqa: E731
    return [
        (attn(arch.q_proj), attn(arch.k_proj), attn(arch.v_proj)),
        (attn(arch.o_proj),),
        (mlp(arch.gate_proj), mlp(arch.up_proj)),
        (mlp(arch.down_proj),),
    ]


def _collect_hessians(
    layer: nn.Module,
    modules: dict[str, QuantLinear],
    inputs: torch.Tensor,
    kwargs_by_size: dict[int, dict],
    batch_size: int,
    device: torch.device,
) -> dict[str, HessianAccumulator]:
    """Hessians of ``modules`` from the layer's forward on every calibration window (stopped once all fired)."""
    accumulators = {name: HessianAccumulator(m.in_features, device) for name, m in modules.items()}
    seen: set[str] = set()

    def record(name: str):
        def hook(module: QuantLinear, args, _output):
            accumulators[name].add(module.matmul_input(args[0]))
            seen.add(name)
            if len(seen) == len(modules):
                raise _Stop

        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in modules.items()]
    try:
        for part in _chunks(inputs.shape[0], batch_size):
            seen.clear()
            with contextlib.suppress(_Stop):
                _run_layer(layer, inputs[part], kwargs_by_size[part.stop - part.start])
    finally:
        for handle in handles:
            handle.remove()
    return accumulators


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    windows: torch.Tensor,
    quant_config: QuantConfig,
    gptq_config: GPTQConfig = GPTQConfig(),
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict:
    """GPTQ every decoder-layer linear of ``model`` in place, layer by layer, on calibration ``windows``.

    ``windows``: token ids ``[n, seqlen]``. ``device``: where each layer is processed (default: where the model
    is); layers are returned to where they were, so a model kept on the CPU is quantized one layer at a time
    on the GPU. Scales and zeros are stored on each :class:`QuantLinear` as RTN stores them. Returns a summary
    (per-linear GPTQ loss, calibration shape).
    """
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError(f"GPTQ calibration windows must be [n, seqlen] with n > 0, got {tuple(windows.shape)}")
    wrap_linears(model)
    device = torch.device(device) if device is not None else _module_device(model)
    arch = get_architecture(model)
    layers = decoder_layers(model)
    groups = _sequential_groups(model)
    batch_size = gptq_config.batch_size
    losses: dict[str, float] = {}

    with activation_quant_off(model):
        inputs, kwargs_by_size = _capture_layer_inputs(model, windows, device, batch_size)
        for index, layer in enumerate(tqdm(layers, desc="GPTQ layers", disable=not progress)):
            with _on_device([layer], device):
                for names in groups:
                    specs = {name: weight_spec_for(name, quant_config, arch.down_proj) for name in names}
                    modules = {name: layer.get_submodule(name) for name in names if specs[name].enabled}
                    if not modules:
                        continue
                    hessians = _collect_hessians(layer, modules, inputs, kwargs_by_size, batch_size, device)
                    for name, module in modules.items():
                        result = gptq_quantize_weight(
                            module.weight.data,
                            hessians.pop(name).hessian(),
                            specs[name],
                            clip_search=quant_config.w_clip,
                            percdamp=gptq_config.percdamp,
                            act_order=gptq_config.act_order,
                            blocksize=gptq_config.blocksize,
                        )
                        module.weight.data.copy_(result.weight)
                        _store_weight_params(module, specs[name], result.scale, result.zero)
                        losses[f"{arch.layers}.{index}.{name}"] = result.loss
                        logger.debug("layer %d %s: GPTQ loss %.4g", index, name, result.loss)
                # The quantized layer's outputs are the next layer's inputs (overwritten in place, chunk by chunk).
                for part in _chunks(inputs.shape[0], batch_size):
                    inputs[part] = _run_layer(layer, inputs[part], kwargs_by_size[part.stop - part.start])
    model.spinquant_gptq = gptq_config
    logger.info(
        "GPTQ: %d linears in %d layers on %d windows of %d tokens (total loss %.4g)",
        len(losses), len(layers), windows.shape[0], windows.shape[1], sum(losses.values()),
    )
    return {
        "nsamples": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "percdamp": gptq_config.percdamp,
        "act_order": gptq_config.act_order,
        "blocksize": gptq_config.blocksize,
        "losses": {name: round(value, 6) for name, value in losses.items()},
    }
