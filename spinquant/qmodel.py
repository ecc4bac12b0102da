"""Save and load a quantized model (``--save_qmodel_path`` / ``--load_qmodel_path``) with real integer weights.

A saved model is a folder, written atomically (built in a temporary folder beside the target, then renamed):

* ``qmodel.safetensors`` -- for every module with integer weights ``<name>`` (decoder linears; with
  ``--export_to_et`` also the 8-bit embedding and lm_head): ``<name>.qweight`` (uint8, the integer levels
  bit-packed along the input dimension, see :func:`pack_levels`), ``<name>.scales`` and, for asymmetric formats
  only, ``<name>.zeros`` (float32, ``[out_features, n_groups]``), and ``<name>.bias`` if any; every other tensor
  (embeddings, norms, lm_head, linears left in floating point) under its state-dict name in the model's dtype.
  Tied embeddings are stored once. The safetensors metadata holds ``format`` / ``version``.
* ``spinquant_qmodel.json`` -- the resolved :class:`~spinquant.config.QuantConfig` and
  :class:`~spinquant.config.RotationConfig`, the dtype, each quantized linear's format (bits, symmetry, group
  size, shape) and which linears run the online Hadamard (R4), whether R3 is on, and where the model came from.
* ``config.json`` (the Hugging Face model config) and the tokenizer files, so the folder is self-contained.

Loading rebuilds the same wrapper with the project's own functions (``wrap_linears``, ``quantize_`` with
``weights=False``): no rotation, clip search or GPTQ is re-run, and the dequantized weights are bitwise those of
the saved model, so its logits are reproduced exactly (same dtype, same device).

Integer levels are stored unsigned: asymmetric levels as they are (0..2^b-1), symmetric levels shifted by
2^(b-1) (so -2^(b-1)..2^(b-1)-1 becomes 0..2^b-1). The weight is ``scale * (q - zero)`` with the signed ``q``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.quant import QuantSpec, dequantize, quantize_to_int

from .config import QuantConfig, RotationConfig
from .model import QuantLinear, check_architecture, decoder_layers, get_architecture, wrap_linears

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "CONFIG_FILE",
    "QModelError",
    "pack_levels",
    "unpack_levels",
    "integer_weight",
    "save_qmodel",
    "load_qmodel",
    "read_qmodel_info",
    "check_qmodel_flags",
    "check_qmodel_model",
]

FORMAT = "spinquant-qmodel"
FORMAT_VERSION = 1
WEIGHTS_FILE = "qmodel.safetensors"
CONFIG_FILE = "spinquant_qmodel.json"

# QuantConfig fields that say how the weights were obtained, not what the saved model is: not compared at load.
PROVENANCE_QUANT_FIELDS = ("w_clip", "w_rtn")
# RotationConfig fields already merged into the saved weights: recorded, not compared at load.
PROVENANCE_ROTATION_FIELDS = ("mode", "seed", "optimized_rotation_path", "center_embeddings")
# Model-config fields that must agree between the file and --input_model.
IDENTITY_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


INTEGER_MODULES = (QuantLinear, nn.Linear, nn.Embedding)


class QModelError(ValueError):
    """A saved quantized model that cannot be used as asked (wrong file, other model, other configuration)."""


# --------------------------------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------------------------------


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"packing supports 1..8 bits, got {bits}")


def pack_levels(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer levels ``[rows, cols]`` (each < 2^bits) into uint8 ``[rows, ceil(cols * bits / 8)]``.

    Each row is one little-endian bit stream: value ``j`` occupies bits ``j*bits .. (j+1)*bits - 1``, least
    significant bit first. With 4 bits, element ``2k`` is the low nibble of byte ``k`` and ``2k+1`` the high one.
    """
    _check_bits(bits)
    if levels.dim() != 2:
        raise ValueError(f"expected a 2-D tensor of levels, got shape {tuple(levels.shape)}")
    if levels.numel() and (levels.min() < 0 or levels.max() >= 2**bits):
        raise ValueError(f"levels must lie in [0, {2**bits - 1}] for {bits} bits")
    rows, cols = levels.shape
    values = levels.to(torch.uint8)
    if bits == 8:
        return values.contiguous()
    shifts = torch.arange(bits, dtype=torch.uint8, device=values.device)
    stream = ((values.unsqueeze(-1) >> shifts) & 1).reshape(rows, cols * bits)
    stream = nn.functional.pad(stream, (0, (-stream.shape[1]) % 8))
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=values.device)
    return (stream.reshape(rows, -1, 8) << byte_shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_levels(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_levels`: uint8 ``[rows, nbytes]`` -> levels ``[rows, cols]`` (uint8)."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"expected a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    rows, nbytes = packed.shape
    if nbytes != (cols * bits + 7) // 8:
        raise ValueError(f"{nbytes} bytes per row cannot hold {cols} values of {bits} bits")
    if bits == 8:
        return packed.clone()
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> byte_shifts) & 1).reshape(rows, nbytes * 8)[:, : cols * bits]
    shifts = torch.arange(bits, dtype=torch.uint8, device=packed.device)
    return (stream.reshape(rows, cols, bits) << shifts).sum(dim=-1, dtype=torch.uint8)


def _level_offset(spec: QuantSpec) -> int:
    """Unsigned storage shift: 0 for asymmetric levels, 2^(b-1) for symmetric ones."""
    return 0 if spec.asym else 2 ** (spec.bits - 1)


# --------------------------------------------------------------------------------------------------------------
# Integer weights
# --------------------------------------------------------------------------------------------------------------


def _grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    out_features, in_features = weight.shape
    return weight.reshape(out_features, groups, in_features // groups)


def _dequantize_grouped(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale * (q - zero)`` per group, in the scales' dtype, cast to ``dtype``: the formula RTN/GPTQ use."""
    out_features, groups, _ = q.shape
    return dequantize(q, scale.unsqueeze(-1), zero.unsqueeze(-1)).to(dtype).reshape(out_features, -1)


@torch.no_grad()
def integer_weight(linear: nn.Module, name: str = "linear") -> torch.Tensor:
    """The signed integer levels (float tensor ``[out, in]``) whose dequantization is exactly ``linear.weight``.

    The levels are recovered from the quantized weight and its stored ``weight_scale`` / ``weight_zero``; the
    result is checked bitwise (``scale * (q - zero)`` cast to the weight's dtype must give the weight back), so a
    weight that is not on its quantization grid fails loudly instead of being saved wrong. In bfloat16 two
    neighbouring levels can round to the same weight; either level then reproduces the weight exactly.
    """
    spec: QuantSpec = linear.weight_spec
    scale, zero = linear.weight_scale, linear.weight_zero
    weight = linear.weight.detach()
    if weight.dtype == torch.float64:
        raise QModelError(f"{name}: float64 weights cannot be saved exactly (their scales are kept in float32)")
    groups = scale.shape[-1]
    if scale.dim() != 2 or scale.shape[0] != weight.shape[0] or weight.shape[1] % groups:
        raise QModelError(f"{name}: scale shape {tuple(scale.shape)} does not fit weight {tuple(weight.shape)}")
    w = _grouped(weight.to(scale.dtype), groups)
    q = quantize_to_int(w, scale.unsqueeze(-1), zero.unsqueeze(-1), spec)
    low, high = (0, spec.maxq) if spec.asym else (-(spec.maxq + 1), spec.maxq)
    bad = _grouped(_dequantize_grouped(q, scale, zero, weight.dtype) != weight, groups)
    for step in (-1.0, 1.0):
        if not bad.any():
            break
        candidate = torch.where(bad, (q + step).clamp(low, high), q)
        fixed = _grouped(_dequantize_grouped(candidate, scale, zero, weight.dtype) == weight, groups) & bad
        q = torch.where(fixed, candidate, q)
        bad = bad & ~fixed
    if not bad.any():
        return q.reshape(weight.shape)
    count = int(bad.sum())
    raise QModelError(
        f"{name}: {count} weight(s) are not on the {spec.bits}-bit grid given by its scales and zeros; "
        "the weights were changed after quantization"
    )


# --------------------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------------------


def _quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Modules carrying integer weights, by state-dict prefix: decoder linears (``weight_spec`` set by RTN or
    GPTQ) and, for an ExecuTorch export, the 8-bit embedding and lm_head."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, INTEGER_MODULES) and getattr(module, "weight_spec", None) is not None:
            found[name] = module
    return found


def _hadamard_linears(model: nn.Module) -> dict[str, bool]:
    """Linears running the online Hadamard (R4) -> whether it runs in float32 (``--fp32_had``)."""
    return {
        name: bool(module.hadamard_fp32)
        for name, module in model.named_modules()
        if isinstance(module, QuantLinear) and module.input_hadamard
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise QModelError(f"unknown dtype {name!r} in the saved model")
    return dtype


def _is_tied(model: nn.Module) -> bool:
    arch = get_architecture(model)
    embed = model.get_submodule(arch.embed_tokens).weight
    head = model.get_submodule(arch.lm_head).weight
    return head is embed or head.data_ptr() == embed.data_ptr()


def _build_info(model: nn.Module, quantized: dict[str, QuantLinear], source: str | None, extra: dict | None) -> dict:
    quant: QuantConfig | None = getattr(model, "spinquant_quant", None)
    rotation: RotationConfig | None = getattr(model, "spinquant_rotation", None)
    layer = decoder_layers(model)[0]
    attn = layer.get_submodule(get_architecture(model).attn)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "architecture": check_architecture(model.config),
        "dtype": _dtype_name(next(model.parameters()).dtype),
        "quant": asdict(quant),
        "rotation": asdict(rotation) if rotation is not None else None,
        "qk_hadamard": bool(getattr(attn, "qk_hadamard", False)),
        "tied_embeddings": _is_tied(model),
        "online_hadamard": _hadamard_linears(model),
        "linears": {
            name: {
                "bits": module.weight_spec.bits,
                "asym": module.weight_spec.asym,
                "groupsize": module.weight_spec.groupsize,
                "shape": list(module.weight.shape),
                "groups": int(module.weight_scale.shape[-1]),
            }
            for name, module in quantized.items()
        },
        "source": source,
        "extra": extra or {},
        "torch": torch.__version__,
        "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


@torch.no_grad()
def _tensors_to_save(model: nn.Module, quantized: dict[str, QuantLinear]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, module in quantized.items():
        spec: QuantSpec = module.weight_spec
        q = integer_weight(module, name)
        levels = (q + _level_offset(spec)).to(torch.int16)
        tensors[f"{name}.qweight"] = pack_levels(levels.cpu(), spec.bits)
        tensors[f"{name}.scales"] = module.weight_scale.detach().to(torch.float32).cpu()
        if spec.asym:  # symmetric zero points are 0 by definition: not stored
            tensors[f"{name}.zeros"] = module.weight_zero.detach().to(torch.float32).cpu()
    skip = {f"{name}.weight" for name in quantized}
    seen: dict[int, str] = {}
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        pointer = value.data_ptr()
        if pointer in seen and value.numel():
            continue  # a tied tensor: stored once, re-tied by the config at load
        seen[pointer] = key
        tensors[key] = value.detach().cpu().contiguous()
    return tensors


def save_qmodel(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    source: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save a model quantized by :func:`spinquant.quantize_` (plus RTN or GPTQ weights) into the folder ``path``.

    ``source`` (e.g. ``--input_model``) and ``extra`` are recorded in the JSON. An existing folder at ``path``
    is replaced only once the new one is complete.
    """
    from safetensors.torch import save_file

    if getattr(model, "spinquant_quant", None) is None:
        raise QModelError("--save_qmodel_path: the model is not quantized (quantize_ was not run)")
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise QModelError(f"--save_qmodel_path: {str(target)!r} exists and is not a folder")
    quantized = _quantized_linears(model)
    info = _build_info(model, quantized, source, extra)
    tensors = _tensors_to_save(model, quantized)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
        with open(staging / CONFIG_FILE, "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=2)
            handle.write("\n")
        model.config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(staging, 0o777 & ~mask)  # mkdtemp makes 0700; give the folder the permissions mkdir would
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, backup / "old")
            os.replace(staging, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    logger.info("quantized model saved to %s (%d integer linears, %.1f MiB)", target, len(quantized), size / 2**20)
    return target


# --------------------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------------------


def read_qmodel_info(path: str | os.PathLike) -> dict:
    """The JSON of a saved model (checked to be ours and of a known version)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        hint = " (an ExecuTorch checkpoint from --export_to_et is not loadable here)" if folder.is_file() else ""
        raise FileNotFoundError(f"--load_qmodel_path: {str(folder)!r} is not a saved model folder{hint}")
    for name in (CONFIG_FILE, WEIGHTS_FILE, "config.json"):
        if not (folder / name).is_file():
            raise QModelError(f"--load_qmodel_path: {str(folder)!r} has no {name}; it was not written by --save_qmodel_path")
    with open(folder / CONFIG_FILE, encoding="utf-8") as handle:
        info = json.load(handle)
    if info.get("format") != FORMAT:
        raise QModelError(f"--load_qmodel_path: {folder / CONFIG_FILE} is not a {FORMAT} file")
    if info.get("version") != FORMAT_VERSION:
        raise QModelError(
            f"--load_qmodel_path: format version {info.get('version')} is not supported (this code reads {FORMAT_VERSION})"
        )
    return info


def check_qmodel_flags(
    info: dict, quant: QuantConfig | None = None, rotation: RotationConfig | None = None, dtype: torch.dtype | None = None
) -> None:
    """Require the command line to describe the saved model: one error listing every flag that differs.

    Compared: every quantization flag except how the weights were found (``--w_clip``, ``--w_rtn``), ``--rotate``,
    the online-Hadamard setting and ``--fp32_had``, and the dtype. Not compared: which rotation was merged
    (``--rotate_mode``, ``--seed``, ``--optimized_rotation_path``): it is in the weights already.
    """
    problems: list[str] = []
    if quant is not None:
        saved = QuantConfig(**info["quant"])
        head_dim = info.get("head_dim")
        asked = quant.for_head_dim(head_dim) if head_dim else quant
        for field in fields(QuantConfig):
            if field.name in PROVENANCE_QUANT_FIELDS:
                continue
            mine, theirs = getattr(asked, field.name), getattr(saved, field.name)
            if mine != theirs:
                problems.append(f"--{field.name} {theirs} (command line: {mine})")
    if rotation is not None:
        saved_rotation = info.get("rotation")
        saved_rotate = bool(saved_rotation and saved_rotation.get("rotate"))
        if rotation.rotate != saved_rotate:
            problems.append(f"--rotate {saved_rotate} (command line: {rotation.rotate})")
        elif saved_rotate:
            for name in ("online_hadamard", "fp32_had"):
                if getattr(rotation, name) != saved_rotation.get(name):
                    problems.append(f"{name} {saved_rotation.get(name)} (command line: {getattr(rotation, name)})")
    if dtype is not None and _dtype_name(dtype) != info["dtype"]:
        problems.append(f"dtype {info['dtype']} (command line gives {_dtype_name(dtype)}: use --bf16/--fp16 to match)")
    if problems:
        raise QModelError(
            "--load_qmodel_path: the saved model was quantized with "
            + "; ".join(problems)
            + ". Pass the flags it was saved with."
        )


def check_qmodel_model(info: dict, model_config, name: str = "--input_model") -> None:
    """Require ``model_config`` (e.g. that of --input_model) to be the model the file was made from."""
    saved = info["model_config"]
    problems = []
    try:
        arch = check_architecture(model_config)
    except ValueError as err:
        raise QModelError(f"{name}: {err}") from err
    if arch != info["architecture"]:
        problems.append(f"architecture {info['architecture']} (yours: {arch})")
    original = dict(saved)
    original.update(info.get("extra", {}).get("original_model_config", {}))
    for field in IDENTITY_FIELDS:
        theirs, mine = original.get(field), getattr(model_config, field, None)
        if field == "num_key_value_heads":
            theirs = theirs or original.get("num_attention_heads")
            mine = mine or getattr(model_config, "num_attention_heads", None)
        if theirs != mine:
            problems.append(f"{field} {theirs} (yours: {mine})")
    if problems:
        raise QModelError(
            f"--load_qmodel_path: the file was saved from another model than {name}: " + "; ".join(problems)
        )


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    file = folder / WEIGHTS_FILE
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise QModelError(f"--load_qmodel_path: {file} is not a {FORMAT} weights file")
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except QModelError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised naming the file
        raise QModelError(f"--load_qmodel_path: cannot read {file}: {err}") from err


def _take(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if key not in tensors:
        raise QModelError(f"--load_qmodel_path: tensor {key!r} is missing from {WEIGHTS_FILE}")
    value = tensors.pop(key)
    if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
        raise QModelError(
            f"--load_qmodel_path: {key!r} is {value.dtype} {tuple(value.shape)}, expected {dtype} {tuple(shape)}"
        )
    return value


@torch.no_grad()
def _load_integer_linears(model: nn.Module, info: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    from .quantize import _store_weight_params

    for name, record in info["linears"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise QModelError(f"--load_qmodel_path: the model has no linear {name!r}") from err
        if not isinstance(module, INTEGER_MODULES):
            raise QModelError(f"--load_qmodel_path: {name!r} is not a linear or embedding of this model")
        out_features, in_features = record["shape"]
        if tuple(module.weight.shape) != (out_features, in_features):
            rows, cols = module.weight.shape
            raise QModelError(
                f"--load_qmodel_path: {name!r} is {out_features}x{in_features} in the file but {rows}x{cols} in the model"
            )
        spec = QuantSpec(record["bits"], record["asym"], record["groupsize"])
        groups = record["groups"]
        nbytes = (in_features * spec.bits + 7) // 8
        packed = _take(tensors, f"{name}.qweight", (out_features, nbytes), torch.uint8)
        scale = _take(tensors, f"{name}.scales", (out_features, groups), torch.float32)
        if spec.asym or f"{name}.zeros" in tensors:
            zero = _take(tensors, f"{name}.zeros", (out_features, groups), torch.float32)
        else:  # symmetric: zero points are 0 and usually not stored
            zero = torch.zeros_like(scale)
        device = module.weight.device
        levels = unpack_levels(packed, spec.bits, in_features).to(device)
        q = levels.to(torch.float32) - _level_offset(spec)
        scale, zero = scale.to(device), zero.to(device)
        module.weight.data.copy_(_dequantize_grouped(_grouped(q, groups), scale, zero, dtype))
        _store_weight_params(module, spec, scale, zero)


def _build_model(folder: Path, dtype: torch.dtype, attn_implementation: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    check_architecture(config)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    model.config.use_cache = False
    return model


def load_qmodel(
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    quant: QuantConfig | None = None,
    rotation: RotationConfig | None = None,
    model_config=None,
):
    """Rebuild a model saved by :func:`save_qmodel`; returns ``(model, tokenizer or None, info)``.

    ``dtype`` defaults to the saved one. ``quant`` / ``rotation`` (the command line's configuration) and
    ``model_config`` (the config of ``--input_model``) are checked against the file when given; a mismatch
    raises :class:`QModelError` naming every differing flag or model dimension. Without them the file's
    configuration is used as it is.
    """
    from .quantize import quantize_

    folder = Path(path).expanduser()
    info = read_qmodel_info(folder)
    with open(folder / "config.json", encoding="utf-8") as handle:
        info["model_config"] = json.load(handle)
    model_cfg = info["model_config"]
    heads = model_cfg["num_attention_heads"]
    info["head_dim"] = model_cfg.get("head_dim") or model_cfg["hidden_size"] // heads
    saved_dtype = _dtype_from_name(info["dtype"])
    if model_config is not None:
        check_qmodel_model(info, model_config)
    check_qmodel_flags(info, quant, rotation, dtype if dtype is not None else None)
    dtype = dtype or saved_dtype

    tensors = _read_tensors(folder)
    model = _build_model(folder, dtype, attn_implementation)
    wrap_linears(model)
    rotation_info = info.get("rotation")
    if rotation_info is not None:
        model.spinquant_rotation = RotationConfig(**rotation_info)
    hadamard = info.get("online_hadamard", {})
    for name, fp32 in hadamard.items():
        module = model.get_submodule(name)
        module.input_hadamard = True
        module.hadamard_fp32 = bool(fp32)

    _load_integer_linears(model, info, tensors, dtype)
    float_keys = set(tensors)
    state = model.state_dict()
    for key, value in tensors.items():
        if key not in state:
            raise QModelError(f"--load_qmodel_path: unexpected tensor {key!r}: the file belongs to another model")
        if tuple(value.shape) != tuple(state[key].shape):
            raise QModelError(
                f"--load_qmodel_path: {key!r} has shape {tuple(value.shape)}, the model needs {tuple(state[key].shape)}"
            )
    missing, _ = model.load_state_dict(tensors, strict=False)
    integer_keys = {f"{name}.weight" for name in info["linears"]}
    tied = {get_architecture(model).lm_head + ".weight"} if info.get("tied_embeddings") else set()
    missing = [key for key in missing if key not in integer_keys and key not in tied]
    if missing:
        raise QModelError(f"--load_qmodel_path: tensor {missing[0]!r} is missing ({len(missing)} in all)")
    if info.get("tied_embeddings") and not _is_tied(model):
        raise QModelError("--load_qmodel_path: the file has tied embeddings but its config does not tie them")

    resolved = quantize_(model, QuantConfig(**info["quant"]), weights=False, progress=False)
    attn = decoder_layers(model)[0].get_submodule(get_architecture(model).attn)
    if bool(getattr(attn, "qk_hadamard", False)) != bool(info.get("qk_hadamard")):
        raise QModelError("--load_qmodel_path: R3 (online Q/K Hadamard) does not come out as saved")
    model.spinquant_quant = resolved
    if device is not None:
        model.to(torch.device(device))
    tokenizer = None
    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    logger.info(
        "loaded quantized model from %s (%d integer linears, %d float tensors)",
        folder, len(info["linears"]), len(float_keys),
    )
    return model, tokenizer, info
