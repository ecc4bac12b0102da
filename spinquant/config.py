"""Configuration objects: what to rotate and what to quantize, independent of the command line.

In the style of torchao, a config object drives a transform::

    rotate_(model, RotationConfig(rotate=True, mode="hadamard", seed=0))  # R3 follows quant.k in quantize_
    quantize_(model, QuantConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_clip=True, a_asym=True))

Both are built from the paper's flags by :func:`quant_config_from_args` / :func:`rotation_config_from_args`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

from utils.quant import QuantSpec

logger = logging.getLogger(__name__)

__all__ = ["QuantConfig", "RotationConfig", "quant_config_from_args", "rotation_config_from_args"]

ROTATE_MODES = ("hadamard", "random")


@dataclass
class QuantConfig:
    """Bits, symmetry, groups and clipping for weights (W), activations (A), the K and the V cache.

    Names and meanings are the paper's flags. ``w_rtn`` picks round-to-nearest instead of GPTQ.
    """

    w_bits: int = 16
    w_groupsize: int = -1
    w_asym: bool = False
    w_clip: bool = False
    w_rtn: bool = False
    a_bits: int = 16
    a_groupsize: int = -1
    a_asym: bool = False
    a_clip_ratio: float = 1.0
    k_bits: int = 16
    k_groupsize: int = -1
    k_asym: bool = False
    k_clip_ratio: float = 1.0
    v_bits: int = 16
    v_groupsize: int = -1
    v_asym: bool = False
    v_clip_ratio: float = 1.0
    int8_down_proj: bool = False

    @property
    def weight(self) -> QuantSpec:
        return QuantSpec(self.w_bits, self.w_asym, self.w_groupsize)

    @property
    def down_proj_weight(self) -> QuantSpec:
        return QuantSpec(8, self.w_asym, self.w_groupsize) if self.int8_down_proj else self.weight

    @property
    def act(self) -> QuantSpec:
        return QuantSpec(self.a_bits, self.a_asym, self.a_groupsize, self.a_clip_ratio)

    def o_proj_act(self, head_dim: int) -> QuantSpec:
        """o_proj's input is quantized per head (groups of head_dim), as in the paper's code."""
        return QuantSpec(self.a_bits, self.a_asym, head_dim, self.a_clip_ratio)

    @property
    def down_proj_act(self) -> QuantSpec:
        bits = 8 if self.int8_down_proj else self.a_bits
        return QuantSpec(bits, self.a_asym, self.a_groupsize, self.a_clip_ratio)

    @property
    def k(self) -> QuantSpec:
        return QuantSpec(self.k_bits, self.k_asym, self.k_groupsize, self.k_clip_ratio)

    @property
    def v(self) -> QuantSpec:
        return QuantSpec(self.v_bits, self.v_asym, self.v_groupsize, self.v_clip_ratio)

    def for_head_dim(self, head_dim: int) -> "QuantConfig":
        """Resolve K/V group sizes against the model: a group larger than head_dim means "per head".

        The paper's scripts pass ``--k_groupsize 128 --v_groupsize 128`` for LLaMA, whose head_dim is 128: one
        group per head. On a model with a smaller head_dim (SmolLM2: 64) a 128-wide group would straddle two
        heads, which the K path cannot do; such a group is clamped to head_dim (per-head groups) with a warning.
        """
        resolved = QuantConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        for prefix in ("k", "v"):
            size = getattr(resolved, f"{prefix}_groupsize")
            if size > head_dim:
                logger.warning(
                    "--%s_groupsize %d is larger than head_dim %d: using %d (one group per head)",
                    prefix, size, head_dim, head_dim,
                )
                setattr(resolved, f"{prefix}_groupsize", head_dim)
            elif size > 0 and head_dim % size:
                raise ValueError(f"--{prefix}_groupsize {size} must divide head_dim {head_dim} (or be -1)")
        return resolved


@dataclass
class RotationConfig:
    """Which rotations to use (paper section 3).

    ``rotate``: merge R1/R2 and add R4 (and R3 when K is quantized). R1/R2 come from ``optimized_rotation_path``
    (an ``R.bin``) if given, else random (``mode`` hadamard or random, seeded by ``seed``).
    ``online_hadamard``: False gives the paper's "no_had" variant (R1/R2 only, nothing online).
    """

    rotate: bool = False
    mode: str = "hadamard"
    seed: int = 0
    optimized_rotation_path: str | None = None
    fp32_had: bool = False
    online_hadamard: bool = True
    center_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ROTATE_MODES:
            raise ValueError(f"--rotate_mode must be one of {ROTATE_MODES}, got {self.mode!r}")


def quant_config_from_args(args) -> QuantConfig:
    return QuantConfig(**{f.name: getattr(args, f.name) for f in fields(QuantConfig) if hasattr(args, f.name)})


def rotation_config_from_args(args) -> RotationConfig:
    # The paper's code accepts --rotation_seed but reads only --seed; here a non-negative --rotation_seed wins.
    rotation_seed = getattr(args, "rotation_seed", -1)
    seed = rotation_seed if rotation_seed is not None and rotation_seed >= 0 else args.seed
    return RotationConfig(
        rotate=bool(args.rotate),
        mode=args.rotate_mode,
        seed=seed,
        optimized_rotation_path=args.optimized_rotation_path or None,
        fp32_had=bool(args.fp32_had),
        online_hadamard=getattr(args, "online_hadamard", None) is not False,
        center_embeddings=bool(getattr(args, "center_embeddings", False)),
    )
