"""Rotation math (paper section 3): norm fusion, R1/R2/R4 merged into weights, random rotations, ``R.bin`` files.

With the RMSNorm scales folded into the next linears, every norm computes ``x / rms(x)``, which commutes with
an orthogonal R1 on the residual stream. So the network is unchanged (in exact arithmetic) when

* the embedding and lm_head are multiplied by R1 (``E R1``, ``W R1``),
* linears reading the residual stream by R1 on their input side (``W R1``),
* linears writing the residual stream by R1^T on their output side (``R1^T W``),
* v_proj's output and o_proj's input, per head, by a per-layer R2 (head_dim x head_dim),
* down_proj's input by a Hadamard R4, done online (``x H``) with ``W H`` merged into down_proj.

Merges run in float64 and are cast back to the weight's dtype, as in the paper's code.

``R.bin`` (the paper's released-rotation format): a ``torch.save``d dict with ``R1`` (hidden x hidden) and
``model.layers.{i}.self_attn.R2`` (head_dim x head_dim) for every layer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from utils.hadamard import hadamard_matrix
from utils.io import torch_save_atomic

from .config import RotationConfig
from .model import QuantLinear, decoder_layers, get_architecture, kv_shape, untie_embeddings, wrap_linears

logger = logging.getLogger(__name__)

__all__ = [
    "R1_KEY",
    "r2_key",
    "random_orthogonal_matrix",
    "random_hadamard_matrix",
    "random_rotation",
    "make_random_rotations",
    "validate_rotations",
    "load_rotations",
    "save_rotations",
    "fuse_layer_norms",
    "merge_rotations",
    "rotate_",
    "ORTHOGONALITY_TOLERANCE",
]

R1_KEY = "R1"
# |R^T R - I| above this is not a rotation; below 1e-4 is the norm for an fp32 file (bf16 files reach ~1e-2).
ORTHOGONALITY_TOLERANCE = 2e-2


def r2_key(layer_index: int) -> str:
    return f"model.layers.{layer_index}.self_attn.R2"


# --------------------------------------------------------------------------------------------------------------
# Random rotations
# --------------------------------------------------------------------------------------------------------------


def random_orthogonal_matrix(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Haar-random orthogonal matrix (float64): QR of a Gaussian matrix with the signs of R's diagonal fixed."""
    gaussian = torch.randn(n, n, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def random_hadamard_matrix(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Normalised Hadamard matrix with random +-1 row signs (float64): ``diag(s) H``."""
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return signs.unsqueeze(1) * hadamard_matrix(n, dtype=torch.float64)


def random_rotation(n: int, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    if mode == "hadamard":
        return random_hadamard_matrix(n, generator)
    if mode == "random":
        return random_orthogonal_matrix(n, generator)
    raise ValueError(f"--rotate_mode must be 'hadamard' or 'random', got {mode!r}")


def make_random_rotations(model: nn.Module, mode: str, seed: int) -> dict[str, torch.Tensor]:
    """R1 and one R2 per layer, in the R.bin layout, drawn from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    _, _, head_dim = kv_shape(model.config)
    rotations = {R1_KEY: random_rotation(model.config.hidden_size, mode, generator)}
    for index in range(len(decoder_layers(model))):
        rotations[r2_key(index)] = random_rotation(head_dim, mode, generator)
    return rotations


# --------------------------------------------------------------------------------------------------------------
# R.bin
# --------------------------------------------------------------------------------------------------------------


def validate_rotations(rotations: dict, model: nn.Module, source: str = "rotations") -> None:
    """Check keys, shapes, finiteness and orthogonality against the model; errors name the offending key."""
    if not isinstance(rotations, dict):
        raise ValueError(f"{source}: expected a dict of tensors, found {type(rotations).__name__}")
    hidden = model.config.hidden_size
    _, _, head_dim = kv_shape(model.config)
    n_layers = len(decoder_layers(model))
    expected = {R1_KEY: hidden, **{r2_key(i): head_dim for i in range(n_layers)}}
    missing = [key for key in expected if key not in rotations]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        layers_in_file = sum(1 for key in rotations if str(key).endswith(".self_attn.R2"))
        raise ValueError(
            f"{source}: missing key {missing[0]!r}{more}; the model has {n_layers} layers, the file has R2 for "
            f"{layers_in_file}"
        )
    unexpected = [key for key in rotations if key not in expected]
    if unexpected:
        raise ValueError(f"{source}: unexpected key {unexpected[0]!r} for a model with {n_layers} layers")
    for key, size in expected.items():
        matrix = rotations[key]
        if not isinstance(matrix, torch.Tensor) or tuple(matrix.shape) != (size, size):
            shape = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
            raise ValueError(f"{source}: {key!r} has shape {shape}, the model needs ({size}, {size})")
        m64 = matrix.detach().to(torch.float64)
        if not torch.isfinite(m64).all():
            raise ValueError(f"{source}: {key!r} contains non-finite values")
        error = (m64.T @ m64 - torch.eye(size, dtype=torch.float64, device=m64.device)).abs().max().item()
        if error > ORTHOGONALITY_TOLERANCE:
            raise ValueError(f"{source}: {key!r} is not orthogonal (max |R^T R - I| = {error:.3g})")
        if error > 1e-4:
            logger.warning("%s: %s is orthogonal only to %.2g (low-precision file?)", source, key, error)


def load_rotations(path: str | os.PathLike, model: nn.Module) -> dict[str, torch.Tensor]:
    """Load and validate an R.bin (learned by us or downloaded from the paper's release)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"--optimized_rotation_path: {str(file)!r} does not exist")
    try:
        rotations = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the flag and file named
        raise ValueError(f"--optimized_rotation_path: cannot read {str(file)!r} as a torch file: {err}") from err
    validate_rotations(rotations, model, source=f"--optimized_rotation_path {file}")
    return {key: value.detach().to(torch.float64) for key, value in rotations.items()}


def save_rotations(rotations: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write an R.bin (float32, CPU tensors, the released format), atomically."""
    payload = {key: value.detach().to(device="cpu", dtype=torch.float32).contiguous() for key, value in rotations.items()}
    return torch_save_atomic(payload, path)


# --------------------------------------------------------------------------------------------------------------
# Fusion and merging
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _scale_inputs(linear: nn.Module, scale: torch.Tensor) -> None:
    weight = linear.weight
    linear.weight.data = (weight.to(torch.float64) * scale.to(torch.float64)).to(weight.dtype)


@torch.no_grad()
def fuse_layer_norms(model: nn.Module, center_embeddings: bool = False) -> None:
    """Fold every RMSNorm scale into the linears that read it and set the scales to one.

    ``center_embeddings`` also subtracts each embedding row's mean, as the paper's code does; that is not an
    identity for RMSNorm models (only for LayerNorm ones), so it is off unless asked for.
    """
    arch = get_architecture(model)
    untie_embeddings(model)
    if center_embeddings:
        embed = model.get_submodule(arch.embed_tokens)
        e64 = embed.weight.data.to(torch.float64)
        embed.weight.data = (e64 - e64.mean(dim=-1, keepdim=True)).to(embed.weight.dtype)
    for layer in decoder_layers(model):
        attn, mlp = layer.get_submodule(arch.attn), layer.get_submodule(arch.mlp)
        pairs = (
            (layer.get_submodule(arch.input_norm), [getattr(attn, n) for n in (arch.q_proj, arch.k_proj, arch.v_proj)]),
            (layer.get_submodule(arch.post_attn_norm), [getattr(mlp, n) for n in (arch.gate_proj, arch.up_proj)]),
        )
        for norm, readers in pairs:
            for linear in readers:
                _scale_inputs(linear, norm.weight.data)
            norm.weight.data.fill_(1.0)
    final_norm = model.get_submodule(arch.final_norm)
    _scale_inputs(model.get_submodule(arch.lm_head), final_norm.weight.data)
    final_norm.weight.data.fill_(1.0)


def _set(param: torch.Tensor, value64: torch.Tensor) -> None:
    param.data = value64.to(device=param.device, dtype=param.dtype)


@torch.no_grad()
def merge_rotations(
    model: nn.Module, rotations: dict[str, torch.Tensor], online_hadamard: bool = True, fp32_had: bool = False
) -> None:
    """Merge R1, the per-layer R2 and (with ``online_hadamard``) R4 into a norm-fused model's weights."""
    arch = get_architecture(model)
    wrap_linears(model)
    heads, kv_heads, head_dim = kv_shape(model.config)
    device = model.get_submodule(arch.embed_tokens).weight.device
    r1 = rotations[R1_KEY].to(device=device, dtype=torch.float64)

    embed = model.get_submodule(arch.embed_tokens)
    _set(embed.weight, embed.weight.data.to(torch.float64) @ r1)
    head = model.get_submodule(arch.lm_head)
    _set(head.weight, head.weight.data.to(torch.float64) @ r1)

    for index, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.get_submodule(arch.attn), layer.get_submodule(arch.mlp)
        r2 = rotations[r2_key(index)].to(device=device, dtype=torch.float64)
        for linear in (getattr(attn, n) for n in (arch.q_proj, arch.k_proj, arch.v_proj)):
            _set(linear.weight, linear.weight.data.to(torch.float64) @ r1)
        for linear in (getattr(mlp, n) for n in (arch.gate_proj, arch.up_proj)):
            _set(linear.weight, linear.weight.data.to(torch.float64) @ r1)
        for linear in (getattr(attn, arch.o_proj), getattr(mlp, arch.down_proj)):
            _set(linear.weight, r1.T @ linear.weight.data.to(torch.float64))
            if linear.bias is not None:
                _set(linear.bias, linear.bias.data.to(torch.float64) @ r1)

        v_proj = getattr(attn, arch.v_proj)
        w_v = v_proj.weight.data.to(torch.float64).view(kv_heads, head_dim, -1)
        _set(v_proj.weight, torch.einsum("ji,hjk->hik", r2, w_v).reshape(kv_heads * head_dim, -1))
        if v_proj.bias is not None:
            _set(v_proj.bias, (v_proj.bias.data.to(torch.float64).view(kv_heads, head_dim) @ r2).reshape(-1))
        o_proj = getattr(attn, arch.o_proj)
        w_o = o_proj.weight.data.to(torch.float64).view(-1, heads, head_dim)
        _set(o_proj.weight, (w_o @ r2).reshape(-1, heads * head_dim))

        if online_hadamard:
            down = getattr(mlp, arch.down_proj)
            assert isinstance(down, QuantLinear)
            h4 = hadamard_matrix(down.in_features, dtype=torch.float64, device=device)
            _set(down.weight, down.weight.data.to(torch.float64) @ h4)
            down.input_hadamard = True
            down.hadamard_fp32 = fp32_had


def rotate_(model: nn.Module, config: RotationConfig) -> dict[str, torch.Tensor] | None:
    """Fuse norms and merge rotations as ``config`` says; returns the R1/R2 used (None without ``rotate``).

    R3 (the online Q/K Hadamard) is switched on by :func:`spinquant.quantize_` when the K cache is quantized,
    because it only matters then.
    """
    if not config.rotate:
        if config.optimized_rotation_path:
            raise ValueError("--optimized_rotation_path is given but --rotate is not: add --rotate to use it")
        return None
    fuse_layer_norms(model, center_embeddings=config.center_embeddings)
    if config.optimized_rotation_path:
        rotations = load_rotations(config.optimized_rotation_path, model)
        logger.info("rotations R1/R2 from %s", config.optimized_rotation_path)
    else:
        rotations = make_random_rotations(model, config.mode, config.seed)
        logger.info("random %s rotations R1/R2 (seed %d)", config.mode, config.seed)
    merge_rotations(model, rotations, online_hadamard=config.online_hadamard, fp32_had=config.fp32_had)
    model.spinquant_rotation = config
    return rotations
