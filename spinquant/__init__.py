"""SpinQuant: LLM quantization with learned rotations (Liu et al., 2024), reproduced.

Public API::

    from spinquant import load_model, rotate_, quantize_, RotationConfig, QuantConfig

    model, tokenizer = load_model("smollm2-135m")
    rotate_(model, RotationConfig(rotate=True, mode="hadamard", seed=0))
    quantize_(model, QuantConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_clip=True, a_asym=True))
"""

from .config import QuantConfig, RotationConfig
from .model import ARCHITECTURES, UnsupportedArchitectureError, load_model, load_tokenizer
from .quantize import quantize_
from .rotation import load_rotations, make_random_rotations, rotate_, save_rotations

__all__ = [
    "ARCHITECTURES",
    "QuantConfig",
    "RotationConfig",
    "UnsupportedArchitectureError",
    "load_model",
    "load_tokenizer",
    "load_rotations",
    "make_random_rotations",
    "quantize_",
    "rotate_",
    "save_rotations",
]

__version__ = "0.1.0"
