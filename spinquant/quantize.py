"""Apply a :class:`~spinquant.config.QuantConfig` to a (rotated) model: RTN weights, activation and KV quantizers.

Where each quantizer sits (the paper's placement):

* the shared input of q/k/v and of gate/up: ``a_*`` (one quantization per block, a forward pre-hook);
* o_proj's input: ``a_*`` in groups of head_dim; down_proj's input: ``a_*`` (8 bits with ``--int8_down_proj``),
  after the online Hadamard R4 when the model is rotated;
* v_proj's output (the V cache): ``v_*`` per token; K after RoPE (and after R3 when rotated): ``k_*`` per token;
* lm_head's input and weight, and the embeddings, stay in floating point.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from utils.quant import ActQuantizer, QuantSpec, quantize_weight_rtn

from .config import QuantConfig
from .model import (
    QuantLinear,
    decoder_layers,
    enable_quant_attention,
    get_architecture,
    kv_shape,
    set_block_input_quantizer,
    wrap_linears,
)

logger = logging.getLogger(__name__)

__all__ = ["quantize_", "quantize_weights_rtn", "configure_activation_quant", "weight_spec_for"]


def weight_spec_for(name: str, config: QuantConfig, down_proj_name: str = "down_proj") -> QuantSpec:
    """The weight format of a decoder linear named ``name`` (down_proj is 8-bit with ``--int8_down_proj``)."""
    return config.down_proj_weight if name.split(".")[-1] == down_proj_name else config.weight


def _store_weight_params(linear: QuantLinear, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor) -> None:
    """Keep scales and zeros beside the dequantized weight so the integers can be recovered for packing/export."""
    linear.weight_spec = spec
    linear.register_buffer("weight_scale", scale.to(torch.float32), persistent=False)
    linear.register_buffer("weight_zero", zero.to(torch.float32), persistent=False)


@torch.no_grad()
def quantize_weights_rtn(model: nn.Module, config: QuantConfig, progress: bool = True) -> None:
    """Round-to-nearest every decoder linear in place (with the ``--w_clip`` search if asked)."""
    wrap_linears(model)
    down_proj_name = get_architecture(model).down_proj
    for layer in tqdm(decoder_layers(model), desc="RTN weights", disable=not progress):
        for name, module in layer.named_modules():
            if not isinstance(module, QuantLinear):
                continue
            spec = weight_spec_for(name, config, down_proj_name)
            if not spec.enabled:
                continue
            deq, scale, zero = quantize_weight_rtn(module.weight.data, spec, clip_search=config.w_clip)
            module.weight.data.copy_(deq)
            _store_weight_params(module, spec, scale, zero)


def configure_activation_quant(model: nn.Module, config: QuantConfig, qk_hadamard: bool) -> None:
    """Install (or clear) the activation, V and K quantizers; ``qk_hadamard`` switches R3 on."""
    arch = get_architecture(model)
    wrap_linears(model)
    _, _, head_dim = kv_shape(model.config)

    def maybe(spec: QuantSpec) -> ActQuantizer | None:
        return ActQuantizer(spec) if spec.enabled else None

    for layer in decoder_layers(model):
        attn, mlp = layer.get_submodule(arch.attn), layer.get_submodule(arch.mlp)
        set_block_input_quantizer(attn, maybe(config.act))
        set_block_input_quantizer(mlp, maybe(config.act))
        getattr(attn, arch.o_proj).input_quantizer = maybe(config.o_proj_act(head_dim))
        getattr(mlp, arch.down_proj).input_quantizer = maybe(config.down_proj_act)
        getattr(attn, arch.v_proj).output_quantizer = maybe(config.v)
    enable_quant_attention(model, qk_hadamard=qk_hadamard, k_spec=config.k)


def quantize_(model: nn.Module, config: QuantConfig, weights: bool = True, progress: bool = True) -> QuantConfig:
    """Quantize ``model`` in place as ``config`` says; returns the config resolved against the model.

    R3 (the online Q/K Hadamard) is used when the model was rotated with online Hadamards and K is quantized.
    Weights are quantized by RTN here when ``weights`` is True and ``w_bits < 16``; GPTQ callers pass
    ``weights=False`` and quantize the weights themselves.
    """
    _, _, head_dim = kv_shape(model.config)
    resolved = config.for_head_dim(head_dim)
    rotation = getattr(model, "spinquant_rotation", None)
    qk_hadamard = bool(rotation is not None and rotation.online_hadamard and resolved.k.enabled)
    if weights and resolved.weight.enabled:
        quantize_weights_rtn(model, resolved, progress=progress)
    configure_activation_quant(model, resolved, qk_hadamard=qk_hadamard)
    model.spinquant_quant = resolved
    return resolved
