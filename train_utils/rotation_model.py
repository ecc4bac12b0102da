"""The network rotation learning trains: the PTQ wrapper, with trainable R1/R2 applied to the frozen weights on the fly.

The model goes through exactly the PTQ preparation (``spinquant.rotation`` / ``spinquant.quantize``): RMSNorm scales
fused into the next linears, R4 merged into down_proj with the online Hadamard on its input, activation/V/K
quantizers installed, R3 online when K is quantized. R1 and R2 are *not* merged: they stay fp32 parameters and

* the embedding output is multiplied by R1 (a forward hook), lm_head's input by R1^T (a pre-hook; lm_head itself
  stays unrotated and unquantized);
* every decoder linear's weight becomes ``Q(rotate(W))`` through a ``torch.nn.utils.parametrize`` parametrization:
  ``W R1`` for q/k/v/gate/up, ``R1^T W`` for o/down, R2 per head on v_proj's output and o_proj's input, computed in
  float32 (float64 for a float64 model), cast to the model dtype and RTN fake-quantized (``--w_clip`` search
  included) with a straight-through estimator -- the weights PTQ would produce for these rotations.

Only R1 and R2 receive gradients; the model is frozen.

**Why a step is cheap.** ``Q(rotate(W))`` depends on R1/R2 only, not on the data, so it is computed once per
optimizer step (:meth:`RotationNetwork.precompute_weights`) and reused by every micro-batch and by the
gradient-checkpoint recomputation -- the paper's code redoes the rotation and the clip search on every forward and
again on every recomputation. Each cached weight is a leaf tensor; when its gradient arrives during backward, a
post-accumulate-grad hook folds it into R1/R2 (recomputing the rotation for that one weight and back-propagating
through it) and drops it, so no weight gradients are kept and nothing but the cached weights outlives a layer.
Because the STE's gradient is the identity, this is the same gradient as back-propagating through
``Q(rotate(W))`` on every forward. Under FSDP (weights sharded, gathered per layer) the weights are instead
computed on the fly inside each layer (``cache_weights=False``), as the paper does.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from spinquant.config import QuantConfig
from spinquant.model import decoder_layers, get_architecture, kv_shape
from spinquant.quantize import configure_activation_quant, weight_spec_for
from spinquant.rotation import R1_KEY, fuse_layer_norms, merge_rotations, r2_key
from utils.quant import QuantSpec, fake_quantize_weight

__all__ = [
    "INPUT_SIDE",
    "OUTPUT_SIDE",
    "V_PROJ",
    "O_PROJ",
    "rotate_weight",
    "identity_rotations",
    "RotationParams",
    "RotatedQuantWeight",
    "CheckpointedLayer",
    "RotationNetwork",
    "build_rotation_network",
    "DeviceTimer",
]

# How R1/R2 enter a weight [out, in].
INPUT_SIDE = "input"  # q/k/gate/up: W R1
OUTPUT_SIDE = "output"  # down: R1^T W
V_PROJ = "v_proj"  # R2^T (per head, on the output rows) W R1
O_PROJ = "o_proj"  # R1^T W R2 (per head, on the input columns)

LOSS_CHUNK_TOKENS = 4096
# Rotated weights quantized in one call, at most about this many elements (bounds the transient memory).
QUANT_BUCKET_ELEMENTS = 1 << 27


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotate_weight(
    weight: torch.Tensor, kind: str, r1: torch.Tensor, r2: torch.Tensor | None = None, head_dim: int = 0
) -> torch.Tensor:
    """``weight`` with R1 (and R2) applied as :func:`spinquant.rotation.merge_rotations` applies them.

    Computed in float32 (float64 for float64 weights); differentiable in r1 and r2.
    """
    dtype = _compute_dtype(weight.dtype)
    w = weight.to(dtype)
    r1 = r1.to(dtype)
    if kind == INPUT_SIDE:
        return w @ r1
    if kind == OUTPUT_SIDE:
        return r1.T @ w
    if kind not in (V_PROJ, O_PROJ):
        raise ValueError(f"unknown weight kind {kind!r}")
    if r2 is None or head_dim <= 0:
        raise ValueError(f"{kind} needs R2 and head_dim")
    r2 = r2.to(dtype)
    if kind == V_PROJ:
        a = (w @ r1).view(-1, head_dim, w.shape[1])  # [heads, head_dim, hidden]
        return (r2.T @ a).reshape(w.shape)
    b = (r1.T @ w).view(w.shape[0], -1, head_dim)  # O_PROJ: [hidden, heads, head_dim]
    return (b @ r2).reshape(w.shape)


def identity_rotations(model: nn.Module) -> dict[str, torch.Tensor]:
    """R1 = I and R2 = I in the R.bin layout: merging them changes no weight, so only R4 gets merged."""
    _, _, head_dim = kv_shape(model.config)
    rotations = {R1_KEY: torch.eye(model.config.hidden_size, dtype=torch.float64)}
    for index in range(len(decoder_layers(model))):
        rotations[r2_key(index)] = torch.eye(head_dim, dtype=torch.float64)
    return rotations


class RotationParams(nn.Module):
    """The trainable rotations: ``r1`` (hidden x hidden) and ``r2[i]`` (head_dim x head_dim), fp32."""

    def __init__(self, rotations: dict[str, torch.Tensor], n_layers: int) -> None:
        super().__init__()
        self.r1 = nn.Parameter(rotations[R1_KEY].detach().to(torch.float32).clone())
        self.r2 = nn.ParameterList(
            [nn.Parameter(rotations[r2_key(i)].detach().to(torch.float32).clone()) for i in range(n_layers)]
        )

    def state_as_rotations(self) -> dict[str, torch.Tensor]:
        """The current rotations in the R.bin layout (detached fp32 CPU copies)."""
        out = {R1_KEY: self.r1.detach().to("cpu", torch.float32).clone()}
        for index, r2 in enumerate(self.r2):
            out[r2_key(index)] = r2.detach().to("cpu", torch.float32).clone()
        return out

    @torch.no_grad()
    def load_rotations(self, rotations: dict[str, torch.Tensor]) -> None:
        self.r1.copy_(rotations[R1_KEY].to(self.r1))
        for index, r2 in enumerate(self.r2):
            r2.copy_(rotations[r2_key(index)].to(r2))


class _Unregistered:
    """Holds a module without registering it as a child (R1/R2 must not become parameters of every linear)."""

    def __init__(self, target: nn.Module) -> None:
        self.target = target


class RotatedQuantWeight(nn.Module):
    """Parametrization ``W -> Q(rotate(W, R1, R2))`` of one decoder linear (STE through Q).

    While :attr:`cached` holds a tensor (set once per optimizer step by :class:`RotationNetwork`), that tensor is
    returned instead of recomputing.
    """

    def __init__(
        self,
        kind: str,
        spec: QuantSpec,
        clip_search: bool,
        rotations: RotationParams,
        layer_index: int,
        head_dim: int,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.spec = spec
        self.clip_search = clip_search
        self.layer_index = layer_index
        self.head_dim = head_dim
        self._rotations = _Unregistered(rotations)
        self._timer: _Unregistered | None = None
        self.cached: torch.Tensor | None = None
        # On the fly, the weight computed for the current call of the linear (its forward may read .weight twice,
        # e.g. for the dtype); cleared by forward hooks when a call starts and ends.
        self._memo: tuple[tuple, torch.Tensor] | None = None

    def trainable(self) -> list[nn.Parameter]:
        """The rotations this weight depends on (R1, plus this layer's R2 for v_proj/o_proj)."""
        rotations = self._rotations.target
        if self.kind in (V_PROJ, O_PROJ):
            return [rotations.r1, rotations.r2[self.layer_index]]
        return [rotations.r1]

    def rotate(self, original: torch.Tensor) -> torch.Tensor:
        rotations = self._rotations.target
        r2 = rotations.r2[self.layer_index] if self.kind in (V_PROJ, O_PROJ) else None
        return rotate_weight(original, self.kind, rotations.r1, r2, self.head_dim)

    def compute(self, original: torch.Tensor) -> torch.Tensor:
        """Rotate, cast to the model dtype (as a merged PTQ weight is), then RTN fake-quantize."""
        rotated = self.rotate(original).to(original.dtype)
        return fake_quantize_weight(rotated, self.spec, clip_search=self.clip_search)

    def _key(self, original: torch.Tensor) -> tuple:
        versions = tuple(p._version for p in self.trainable())
        return (original.data_ptr(), original._version, versions, torch.is_grad_enabled())

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if self.cached is not None:
            return self.cached
        key = self._key(original)
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        if self._timer is None:
            weight = self.compute(original)
        else:
            with self._timer.target.region():
                weight = self.compute(original)
        self._memo = (key, weight)
        return weight

    def end_call(self) -> None:
        self._memo = None

    def extra_repr(self) -> str:
        s = self.spec
        return f"kind={self.kind}, layer={self.layer_index}, bits={s.bits}, asym={s.asym}, clip={self.clip_search}"


class CheckpointedLayer(nn.Module):
    """A decoder layer recomputed in backward (non-reentrant ``torch.utils.checkpoint``) while training.

    Our own wrapper rather than transformers' switch, so the behaviour does not depend on the transformers version
    and FSDP's hooks (on this wrapper) stay outside the recomputed region.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)
        return self.layer(*args, **kwargs)


class DeviceTimer:
    """Sums the time spent in code regions; on CUDA with events (no synchronisation until :meth:`collect`)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0

    @contextlib.contextmanager
    def region(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((start, end))
        else:
            begin = time.perf_counter()
            try:
                yield
            finally:
                self._seconds += time.perf_counter() - begin

    def collect(self) -> float:
        """Seconds accumulated since the last call (synchronises CUDA), then reset."""
        seconds = self._seconds
        if self._events:
            torch.cuda.synchronize()
            seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1000.0
        self._events, self._seconds = [], 0.0
        return seconds


@dataclass
class _Linear:
    name: str
    module: nn.Module
    param: RotatedQuantWeight

    @property
    def original(self) -> torch.Tensor:
        return self.module.parametrizations.weight.original


class RotationNetwork(nn.Module):
    """The frozen, quantized model plus its trainable rotations; ``forward(input_ids)`` gives the summed loss.

    Build it with :func:`build_rotation_network`.
    """

    def __init__(
        self,
        model: nn.Module,
        rotations: RotationParams,
        linears: list[_Linear],
        quant: QuantConfig,
        cache_weights: bool,
        loss_chunk_tokens: int = LOSS_CHUNK_TOKENS,
    ) -> None:
        super().__init__()
        self.model = model
        self.rotations = rotations
        self.quant = quant
        self.cache_weights = cache_weights
        self.loss_chunk_tokens = loss_chunk_tokens
        self._linears = linears
        self.set_timer_device(rotations.r1.device)

    def set_timer_device(self, device: torch.device) -> None:
        """Time the rotation work on ``device`` (the weight cache and, on the fly, each weight's computation)."""
        self.rotation_timer = DeviceTimer(device)
        for linear in self._linears:
            linear.param._timer = _Unregistered(self.rotation_timer)

    # -- the per-step weight cache --------------------------------------------------------------------------------

    def precompute_weights(self) -> None:
        """Compute ``Q(rotate(W))`` of every decoder linear for the current R1/R2 (once per optimizer step).

        Weights with the same format and input width are quantized together, rows stacked (RTN and its clip search
        work row by row, so the result is identical), in buckets of about ``QUANT_BUCKET_ELEMENTS``: a handful of
        clip searches per step instead of one per linear.
        """
        if not self.cache_weights:
            return
        with self.rotation_timer.region(), torch.no_grad():
            buckets: dict[tuple, list[tuple[_Linear, torch.Tensor]]] = {}
            for linear in self._linears:
                rotated = linear.param.rotate(linear.original).to(linear.original.dtype)
                if not linear.param.spec.enabled:
                    self._cache(linear, rotated)
                    continue
                key = (linear.param.spec, linear.param.clip_search, rotated.shape[1], rotated.dtype)
                bucket = buckets.setdefault(key, [])
                bucket.append((linear, rotated))
                if sum(r.numel() for _, r in bucket) >= QUANT_BUCKET_ELEMENTS:
                    self._quantize_bucket(key, buckets.pop(key))
            for key, bucket in buckets.items():
                self._quantize_bucket(key, bucket)

    def _quantize_bucket(self, key: tuple, bucket: list[tuple[_Linear, torch.Tensor]]) -> None:
        spec, clip_search = key[0], key[1]
        stacked = torch.cat([rotated for _, rotated in bucket]) if len(bucket) > 1 else bucket[0][1]
        quantized = fake_quantize_weight(stacked, spec, clip_search=clip_search)
        for (linear, _), part in zip(bucket, quantized.split([r.shape[0] for _, r in bucket])):
            self._cache(linear, part)

    def _cache(self, linear: _Linear, weight: torch.Tensor) -> None:
        leaf = weight.detach().requires_grad_(True)
        leaf.register_post_accumulate_grad_hook(functools.partial(self._fold_gradient, linear))
        linear.param.cached = leaf

    def release_weights(self) -> None:
        """Drop the cached weights (after the last micro-batch of a step, or on error)."""
        for linear in self._linears:
            linear.param.cached = None

    def _fold_gradient(self, linear: _Linear, weight: torch.Tensor) -> None:
        """Push a cached weight's gradient through ``rotate`` into R1/R2, then free it (runs inside backward)."""
        grad = weight.grad
        weight.grad = None
        if grad is None:
            return
        with self.rotation_timer.region(), torch.enable_grad():
            inputs = linear.param.trainable()
            rotated = linear.param.rotate(linear.original)
            grads = torch.autograd.grad(rotated, inputs, grad_outputs=grad.to(rotated.dtype))
            for param, g in zip(inputs, grads):
                g = g.to(param.dtype)
                if param.grad is None:
                    param.grad = g
                else:
                    param.grad.add_(g)

    @contextlib.contextmanager
    def step_weights(self) -> Iterator[None]:
        """Context of one optimizer step: weights computed on entry, released on exit (also on error)."""
        self.precompute_weights()
        try:
            yield
        finally:
            self.release_weights()

    # -- forward ---------------------------------------------------------------------------------------------------

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden).float()
        return nn.functional.cross_entropy(logits, targets, reduction="sum")

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy over ``input_ids`` ``[batch, seqlen]`` (fp32) and the token count.

        The logits are formed ``loss_chunk_tokens`` positions at a time (and recomputed in backward), so the full
        ``[batch, seqlen, vocab]`` logits never exist.
        """
        hidden = self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        hidden = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
        targets = input_ids[:, 1:].reshape(-1)
        recompute = self.training and torch.is_grad_enabled()
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), self.loss_chunk_tokens):
            stop = start + self.loss_chunk_tokens
            if recompute:
                part = checkpoint(self._chunk_loss, hidden[start:stop], targets[start:stop], use_reentrant=False)
            else:
                part = self._chunk_loss(hidden[start:stop], targets[start:stop])
            total = total + part
        return total, targets.numel()

    # -- introspection ---------------------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.rotations.parameters())

    def effective_weights(self) -> dict[str, torch.Tensor]:
        """``Q(rotate(W))`` of every decoder linear for the current rotations (for checks and tests)."""
        with torch.no_grad():
            return {linear.name: linear.param.compute(linear.original) for linear in self._linears}

    def decoder_layer_modules(self) -> list[nn.Module]:
        """The decoder layers themselves (inside their checkpoint wrappers, if any)."""
        return [getattr(layer, "layer", layer) for layer in decoder_layers(self.model)]


def _rotate_residual(x: torch.Tensor, r1: torch.Tensor, transpose: bool) -> torch.Tensor:
    dtype = _compute_dtype(x.dtype)
    r = r1.to(dtype)
    return (x.to(dtype) @ (r.T if transpose else r)).to(x.dtype)


def build_rotation_network(
    model: nn.Module,
    quant: QuantConfig,
    init_rotations: dict[str, torch.Tensor],
    *,
    fp32_had: bool = False,
    online_hadamard: bool = True,
    center_embeddings: bool = False,
    cache_weights: bool = True,
    gradient_checkpointing: bool = True,
    loss_chunk_tokens: int = LOSS_CHUNK_TOKENS,
) -> RotationNetwork:
    """Turn a freshly loaded model into the network rotation learning trains (in place; returns the wrapper).

    ``init_rotations``: R1/R2 to start from (R.bin layout), e.g. :func:`spinquant.rotation.make_random_rotations`.
    ``cache_weights``: compute the rotated, quantized weights once per step (False: on every forward, for FSDP).
    ``online_hadamard``: False is the paper's "no_had" variant (no R4, no R3), to pair with PTQ's
    ``--online_hadamard False``.
    """
    arch = get_architecture(model)
    heads, kv_heads, head_dim = kv_shape(model.config)
    for param in model.parameters():
        param.requires_grad_(False)

    # The PTQ preparation, minus R1/R2: norms fused, R4 merged (+ online), quantizers and R3.
    fuse_layer_norms(model, center_embeddings=center_embeddings)
    merge_rotations(model, identity_rotations(model), online_hadamard=online_hadamard, fp32_had=fp32_had)
    resolved = quant.for_head_dim(head_dim)
    configure_activation_quant(model, resolved, qk_hadamard=online_hadamard and resolved.k.enabled)
    model.spinquant_quant = resolved

    layers = list(decoder_layers(model))
    device = model.get_submodule(arch.embed_tokens).weight.device
    rotations = RotationParams(init_rotations, len(layers)).to(device)

    kinds = {
        arch.q_proj: INPUT_SIDE,
        arch.k_proj: INPUT_SIDE,
        arch.v_proj: V_PROJ,
        arch.o_proj: O_PROJ,
        arch.gate_proj: INPUT_SIDE,
        arch.up_proj: INPUT_SIDE,
        arch.down_proj: OUTPUT_SIDE,
    }
    linears: list[_Linear] = []
    for index, layer in enumerate(layers):
        for block_name, names in ((arch.attn, arch.attn_linears), (arch.mlp, arch.mlp_linears)):
            block = layer.get_submodule(block_name)
            for name in names:
                module = getattr(block, name)
                spec = weight_spec_for(name, resolved, arch.down_proj)
                param = RotatedQuantWeight(kinds[name], spec, resolved.w_clip, rotations, index, head_dim)
                parametrize.register_parametrization(module, "weight", param, unsafe=True)
                # The memo lives for one call of the linear: cleared when it starts (a recomputation stopped early
                # by the checkpoint never reaches the end) and when it ends.
                module.register_forward_pre_hook(lambda _m, _args, param=param: param.end_call())
                module.register_forward_hook(lambda _m, _args, _out, param=param: param.end_call())
                linears.append(_Linear(f"{arch.layers}.{index}.{block_name}.{name}", module, param))

    embed = model.get_submodule(arch.embed_tokens)
    head = model.get_submodule(arch.lm_head)
    embed.register_forward_hook(lambda _m, _args, out: _rotate_residual(out, rotations.r1, transpose=False))
    head.register_forward_pre_hook(lambda _m, args: (_rotate_residual(args[0], rotations.r1, True), *args[1:]))

    if gradient_checkpointing:
        module_list = decoder_layers(model)
        for index in range(len(module_list)):
            module_list[index] = CheckpointedLayer(module_list[index])

    network = RotationNetwork(model, rotations, linears, resolved, cache_weights, loss_chunk_tokens)
    network.train()
    return network
