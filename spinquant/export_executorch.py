"""ExecuTorch export (``--export_to_et``): the pre-quantized checkpoint ExecuTorch's Llama export reads for SpinQuant.

ExecuTorch (``pip install executorch``) builds a phone-ready ``.pte`` from a pre-quantized checkpoint with its
``examples/models/llama`` export and the ``llama_xnnpack_spinquant.yaml`` configuration: ``preq_mode``
``8da4w_output_8da8w``, ``preq_group_size`` 32, ``preq_embedding_quantize`` ``8,0``, ``use_spin_quant`` ``native``.
That means

* decoder linears: 4-bit symmetric group-wise weights (int8 tensors holding -8..7, float32 ``scales``
  ``[out, in / group]``; ExecuTorch sets every zero point to 0), 8-bit dynamic per-token asymmetric activations;
* output layer (lm_head): 8-bit symmetric per-channel weights (``scales`` ``[vocab]``), 8-bit dynamic activations;
* token embedding: 8-bit symmetric per-row weights (``scales`` ``[vocab]``);
* R1/R2 merged into the weights, R4 inserted by ExecuTorch as ``torch.ops.llama.fast_hadamard_transform`` before
  every ``w2`` (down_proj); no R3 and no KV-cache quantization.

ExecuTorch's own module names are used (``tok_embeddings``, ``layers.N.attention.wq`` ... ``feed_forward.w1/w2/w3``,
``attention_norm``, ``ffn_norm``, ``norm``, ``output``), with Q/K rows in Meta's interleaved RoPE layout.

ExecuTorch's native Hadamard only handles sizes 2^k (for 28 * 2^k it uses a different, unnormalised matrix), so a
model whose intermediate size is not a power of two (SmolLM2: 1536 = 12 * 128) gets its MLP zero-padded to the
next power of two *before* rotation (:func:`pad_mlp_for_executorch`): the padded channels are identically zero,
so the network is unchanged, and R4 becomes a Hadamard ExecuTorch computes exactly as we do.

This module needs ExecuTorch only for :func:`export_pte` and :func:`run_pte` (imported lazily); building and
saving the checkpoint needs torch alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from utils.io import torch_save_atomic, write_json
from utils.quant import QuantSpec, quantize_weight_rtn

from .config import QuantConfig, RotationConfig
from .model import QuantLinear, decoder_layers, get_architecture, kv_shape, untie_embeddings

logger = logging.getLogger(__name__)

__all__ = [
    "ET_GROUP_SIZES",
    "ExecuTorchExportError",
    "executorch_available",
    "require_executorch",
    "check_export_config",
    "executorch_hadamard_size",
    "pad_mlp_for_executorch",
    "quantize_embeddings_for_executorch",
    "executorch_checkpoint",
    "executorch_params",
    "save_executorch_checkpoint",
    "ExportPaths",
    "export_pte",
    "run_pte",
    "compare_with_pte",
    "our_logits",
    "mirror_executorch_activations",
    "main",
]

ET_GROUP_SIZES = (32, 64, 128, 256)  # ExecuTorch's pre-quantized loader accepts these group sizes only
ET_EMBEDDING_BITS = 8
ET_CONFIG = "examples/models/llama/config/llama_xnnpack_spinquant.yaml"
INSTALL_HINT = "pip install executorch==1.5.1 (with torchao 0.18), the optional ExecuTorch extra"


class ExecuTorchExportError(ValueError):
    """The model or the flags cannot be exported as ExecuTorch's SpinQuant checkpoint."""


def executorch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("executorch") is not None


def require_executorch() -> None:
    if not executorch_available():
        raise ModuleNotFoundError(f"ExecuTorch is not installed: {INSTALL_HINT}")


# --------------------------------------------------------------------------------------------------------------
# What can be exported
# --------------------------------------------------------------------------------------------------------------


def check_export_config(quant: QuantConfig, rotation: RotationConfig) -> None:
    """Refuse flags whose model ExecuTorch's SpinQuant path would not compute; one error lists every problem."""
    problems = []
    if not rotation.rotate or not rotation.online_hadamard:
        problems.append("--rotate (ExecuTorch inserts the online Hadamard R4 before every down_proj)")
    if quant.w_bits != 4:
        problems.append(f"--w_bits 4 (got {quant.w_bits}: ExecuTorch's 8da4w layers hold 4-bit weights)")
    if quant.w_asym:
        problems.append("no --w_asym (ExecuTorch's 8da4w loader sets every weight zero point to 0)")
    if quant.w_groupsize not in ET_GROUP_SIZES:
        problems.append(f"--w_groupsize in {ET_GROUP_SIZES} (got {quant.w_groupsize})")
    if quant.int8_down_proj:
        problems.append("no --int8_down_proj (ExecuTorch quantizes every decoder linear to 4 bits)")
    if quant.a_bits != 8 or not quant.a_asym or quant.a_groupsize != -1 or quant.a_clip_ratio != 1.0:
        problems.append(
            "--a_bits 8 --a_asym without --a_groupsize/--a_clip_ratio (ExecuTorch quantizes activations "
            "dynamically per token, asymmetric 8-bit; the evaluated model must be the exported one)"
        )
    if quant.k_bits < 16 or quant.v_bits < 16:
        problems.append("--k_bits 16 --v_bits 16 (ExecuTorch's SpinQuant path has no R3 and no KV quantization)")
    if problems:
        raise ExecuTorchExportError("--export_to_et needs " + "; ".join(problems))


def executorch_hadamard_size(n: int) -> int:
    """The size R4 must have for ExecuTorch's native Hadamard: n itself if a power of two, else the next one."""
    return 1 << (n - 1).bit_length()


def _pad_linear(linear: nn.Linear, out_features: int | None = None, in_features: int | None = None) -> None:
    weight = linear.weight.data
    rows = (out_features or weight.shape[0]) - weight.shape[0]
    cols = (in_features or weight.shape[1]) - weight.shape[1]
    padded = nn.functional.pad(weight, (0, cols, 0, rows))
    linear.weight = nn.Parameter(padded, requires_grad=linear.weight.requires_grad)
    if linear.bias is not None and rows:
        linear.bias = nn.Parameter(nn.functional.pad(linear.bias.data, (0, rows)), requires_grad=False)
    linear.out_features, linear.in_features = padded.shape


@torch.no_grad()
def pad_mlp_for_executorch(model: nn.Module) -> dict[str, int] | None:
    """Zero-pad the MLP so its intermediate size is a power of two; returns ``{"from", "to"}`` or None.

    Extra gate/up rows are zero, so the extra channels of ``silu(gate) * up`` are exactly zero and the extra
    down_proj columns never contribute: the model computes the same function. Run before rotation, so R4 is
    drawn at the padded size.
    """
    arch = get_architecture(model)
    size = model.config.intermediate_size
    target = executorch_hadamard_size(size)
    if target == size:
        return None
    if getattr(model, "spinquant_rotation", None) is not None:
        raise ExecuTorchExportError("pad_mlp_for_executorch must run before the model is rotated")
    for layer in decoder_layers(model):
        mlp = layer.get_submodule(arch.mlp)
        _pad_linear(getattr(mlp, arch.gate_proj), out_features=target)
        _pad_linear(getattr(mlp, arch.up_proj), out_features=target)
        _pad_linear(getattr(mlp, arch.down_proj), in_features=target)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = target
    model.config.intermediate_size = target
    logger.info(
        "ExecuTorch's Hadamard needs a power of two: MLP zero-padded from %d to %d channels (same function)",
        size, target,
    )
    return {"from": size, "to": target}


@torch.no_grad()
def quantize_embeddings_for_executorch(model: nn.Module, clip_search: bool = False) -> None:
    """8-bit symmetric per-row RTN of the token embedding and of lm_head, as ExecuTorch's checkpoint holds them.

    The paper's code does the same with ``--export_to_et`` (before GPTQ, so calibration sees the 8-bit
    embedding), so the evaluated model is the exported one. Scales are kept on the modules for the export.
    """
    from .quantize import _store_weight_params

    arch = get_architecture(model)
    untie_embeddings(model)
    spec = QuantSpec(ET_EMBEDDING_BITS, asym=False, groupsize=-1)
    for path in (arch.embed_tokens, arch.lm_head):
        module = model.get_submodule(path)
        deq, scale, zero = quantize_weight_rtn(module.weight.data, spec, clip_search=clip_search)
        module.weight.data.copy_(deq)
        _store_weight_params(module, spec, scale, zero)


# --------------------------------------------------------------------------------------------------------------
# The checkpoint
# --------------------------------------------------------------------------------------------------------------


def _integers(module: nn.Module, name: str, bits: int, asym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 levels, float32 scales) of a module quantized symmetric at ``bits``; exact or an error."""
    from .qmodel import integer_weight

    spec: QuantSpec | None = getattr(module, "weight_spec", None)
    if spec is None:
        raise ExecuTorchExportError(f"{name} is not quantized; run PTQ with --export_to_et")
    if spec.bits != bits or spec.asym != asym:
        raise ExecuTorchExportError(f"{name} is {spec.bits}-bit{' asymmetric' if spec.asym else ''}, ExecuTorch needs {bits}-bit symmetric")
    q = integer_weight(module, name)
    return q.to(torch.int8).cpu().contiguous(), module.weight_scale.detach().to(torch.float32).cpu().contiguous()


def _meta_rope_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a Q/K projection from Hugging Face's half-split RoPE layout to Meta's interleaved one.

    Within a head, HF keeps the two members of a rotated pair at rows ``j`` and ``j + head_dim/2``; Meta keeps
    them at ``2j`` and ``2j + 1``.
    """
    rows = tensor.shape[0]
    head_dim = rows // heads
    return tensor.reshape(heads, 2, head_dim // 2, *tensor.shape[1:]).transpose(1, 2).reshape(rows, *tensor.shape[1:])


def executorch_checkpoint(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict ExecuTorch's Llama export loads with ``use_spin_quant`` / ``preq_mode 8da4w_output_8da8w``."""
    arch = get_architecture(model)
    heads, kv_heads, _ = kv_shape(model.config)
    if getattr(model.config, "attention_bias", False) or getattr(model.config, "mlp_bias", False):
        raise ExecuTorchExportError("ExecuTorch's Llama has no linear biases; this model has some")
    # ExecuTorch takes the checkpoint's dtype from its FIRST tensor and accepts only float dtypes: a float
    # tensor goes first.
    state: dict[str, torch.Tensor] = {"norm.weight": model.get_submodule(arch.final_norm).weight.detach().float().cpu()}
    embed_q, embed_scale = _integers(model.get_submodule(arch.embed_tokens), "the token embedding", ET_EMBEDDING_BITS)
    state["tok_embeddings.weight"], state["tok_embeddings.scales"] = embed_q, embed_scale.reshape(-1)
    names = {
        arch.q_proj: "attention.wq", arch.k_proj: "attention.wk", arch.v_proj: "attention.wv",
        arch.o_proj: "attention.wo", arch.gate_proj: "feed_forward.w1", arch.down_proj: "feed_forward.w2",
        arch.up_proj: "feed_forward.w3",
    }
    for index, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.get_submodule(arch.attn), layer.get_submodule(arch.mlp)
        for ours, theirs in names.items():
            module = getattr(attn, ours) if ours in arch.attn_linears else getattr(mlp, ours)
            q, scale = _integers(module, f"layer {index} {ours}", 4)
            if ours in (arch.q_proj, arch.k_proj):
                n = heads if ours == arch.q_proj else kv_heads
                q, scale = _meta_rope_rows(q, n), _meta_rope_rows(scale, n)
            state[f"layers.{index}.{theirs}.weight"] = q
            state[f"layers.{index}.{theirs}.scales"] = scale
        down = getattr(mlp, arch.down_proj)
        if not (isinstance(down, QuantLinear) and down.input_hadamard):
            raise ExecuTorchExportError(f"layer {index} down_proj has no online Hadamard; ExecuTorch will insert one")
        state[f"layers.{index}.attention_norm.weight"] = layer.get_submodule(arch.input_norm).weight.detach().float().cpu()
        state[f"layers.{index}.ffn_norm.weight"] = layer.get_submodule(arch.post_attn_norm).weight.detach().float().cpu()
    head_q, head_scale = _integers(model.get_submodule(arch.lm_head), "lm_head", ET_EMBEDDING_BITS)
    state["output.weight"], state["output.scales"] = head_q, head_scale.reshape(-1)
    return {key: value.contiguous() for key, value in state.items()}


def _rope_params(config) -> dict[str, Any]:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {"rope_theta": float(theta), "use_scaled_rope": False}
    if kind == "llama3":
        # ExecuTorch's scaled RoPE hard-codes low_freq_factor 1 and an original context of 8192 (LLaMA 3.1/3.2).
        if rope.get("low_freq_factor", 1) != 1 or rope.get("original_max_position_embeddings", 8192) != 8192:
            raise ExecuTorchExportError(f"ExecuTorch's scaled RoPE cannot express this model's rope scaling {rope}")
        return {
            "rope_theta": float(theta), "use_scaled_rope": True,
            "rope_scale_factor": int(rope["factor"]), "high_freq_factor": int(rope.get("high_freq_factor", 4)),
        }
    raise ExecuTorchExportError(f"ExecuTorch's Llama has no RoPE of type {kind!r}")


def executorch_params(model: nn.Module, group_size: int) -> dict[str, Any]:
    """ExecuTorch's ``params.json`` (its ``ModelArgs``) for this model."""
    config = model.config
    heads, kv_heads, head_dim = kv_shape(config)
    return {
        "dim": config.hidden_size,
        "n_layers": len(decoder_layers(model)),
        "n_heads": heads,
        "n_kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": config.vocab_size,
        "hidden_dim": config.intermediate_size,
        "norm_eps": float(config.rms_norm_eps),
        **_rope_params(config),
        "quantization_args": {"group_size": group_size},
    }


@dataclass(frozen=True)
class ExportPaths:
    """Files written next to each other by :func:`save_executorch_checkpoint`."""

    checkpoint: Path
    params: Path
    info: Path


def export_paths(checkpoint: str | os.PathLike) -> ExportPaths:
    path = Path(checkpoint).expanduser()
    stem = path.name.rsplit(".", 1)[0] if "." in path.name else path.name
    return ExportPaths(path, path.with_name(f"{stem}.params.json"), path.with_name(f"{stem}.export.json"))


def _token_ids(tokenizer) -> dict[str, Any]:
    if tokenizer is None:
        return {}
    eos = tokenizer.eos_token_id
    return {"get_bos_id": tokenizer.bos_token_id, "get_eos_ids": [eos] if eos is not None else []}


def save_executorch_checkpoint(
    model: nn.Module, path: str | os.PathLike, tokenizer=None, extra: dict[str, Any] | None = None
) -> ExportPaths:
    """Write the checkpoint (``torch.save`` of the state dict, as ExecuTorch loads it), its ``params.json`` and
    an ``export.json`` with the runtime metadata and the export command; every file atomically."""
    quant: QuantConfig | None = getattr(model, "spinquant_quant", None)
    if quant is None:
        raise ExecuTorchExportError("--export_to_et: the model is not quantized")
    paths = export_paths(path)
    if paths.checkpoint.is_dir():
        raise ExecuTorchExportError(f"--save_qmodel_path {str(paths.checkpoint)!r} is a folder; --export_to_et writes a file")
    state = executorch_checkpoint(model)
    params = executorch_params(model, quant.w_groupsize)
    torch_save_atomic(state, paths.checkpoint)
    write_json(paths.params, params)
    metadata = _token_ids(tokenizer)
    info = {
        "checkpoint": str(paths.checkpoint),
        "params": str(paths.params),
        "executorch_config": ET_CONFIG,
        "preq_group_size": quant.w_groupsize,
        "metadata": metadata,
        "export_command": export_command(paths, output_dir=str(paths.checkpoint.parent), metadata=metadata),
        **(extra or {}),
    }
    write_json(paths.info, info)
    logger.info("ExecuTorch checkpoint written to %s (params %s)", paths.checkpoint, paths.params)
    return paths


# --------------------------------------------------------------------------------------------------------------
# ExecuTorch side (optional dependency)
# --------------------------------------------------------------------------------------------------------------


def _executorch_config_file() -> Path:
    require_executorch()
    import executorch

    path = Path(next(iter(executorch.__path__))) / ET_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"ExecuTorch's {ET_CONFIG} is missing from the installed package")
    return path


def export_command(
    paths: ExportPaths,
    output_dir: str,
    name: str | None = None,
    metadata: dict | None = None,
    max_seq_length: int = 2048,
    python: str = "python",
) -> list[str]:
    """ExecuTorch's own export command for this checkpoint (hydra CLI with the SpinQuant yaml, group size set)."""
    group = json.loads(paths.params.read_text())["quantization_args"]["group_size"] if paths.params.is_file() else 32
    # "++" adds a key or overrides it: the yaml sets some of these and not others.
    command = [
        python, "-m", "executorch.extension.llm.export.export_llm",
        "--config", "<executorch>/" + ET_CONFIG,
        f"++base.checkpoint={paths.checkpoint}",
        f"++base.params={paths.params}",
        f"++base.preq_group_size={group}",
        f"++export.output_dir={output_dir}",
        f"++export.max_seq_length={max_seq_length}",
        f"++export.max_context_length={max_seq_length}",
        "hydra.output_subdir=null",  # no .hydra/ logs folder
        "hydra.run.dir=.",
    ]
    if name:
        command.append(f"++export.output_name={name}")
    if metadata:
        command.append(_metadata_override(metadata))
    return command


def _metadata_override(metadata: dict) -> str:
    """Hydra override for the runtime metadata (a JSON string, quoted so Hydra keeps it a string)."""
    return "++base.metadata='" + json.dumps(metadata, separators=(",", ":")) + "'"


def export_pte(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    name: str = "model.pte",
    max_seq_length: int = 2048,
    metadata: dict | None = None,
    timeout: float | None = None,
) -> Path:
    """Run ExecuTorch's Llama export on our checkpoint (XNNPACK, the SpinQuant yaml) and return the ``.pte``.

    Runs ``executorch.extension.llm.export.export_llm`` in a subprocess with the installed
    ``llama_xnnpack_spinquant.yaml``, overriding only paths, the group size and the sequence length.
    """
    paths = export_paths(checkpoint)
    config = _executorch_config_file()
    output = Path(output_dir).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    command = export_command(paths, str(output), name, metadata, max_seq_length, python=sys.executable)
    command[command.index("--config") + 1] = str(config)
    logger.info("running ExecuTorch's export: %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=output)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-4000:]
        raise RuntimeError(f"ExecuTorch's export failed (exit {done.returncode}):\n{tail}")
    pte = output / name
    if not pte.is_file():
        raise RuntimeError(f"ExecuTorch's export finished but {pte} is missing:\n{(done.stdout + done.stderr)[-2000:]}")
    return pte


def run_pte(pte: str | os.PathLike, tokens: Sequence[int], progress: bool = True) -> torch.Tensor:
    """Next-token logits ``[len(tokens), vocab]`` from ExecuTorch's runtime, one token per call with its KV cache."""
    from tqdm.auto import tqdm

    require_executorch()
    # As ExecuTorch's own Python runner does: the runtime first, then the llama:: custom kernels (SDPA with KV
    # cache, fast Hadamard) and the quantized kernels (8-bit embedding), which register into it.
    from executorch.extension.pybindings.portable_lib import _load_for_executorch
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.kernels import quantized  # noqa: F401

    program = _load_for_executorch(str(pte))
    rows = []
    for position, token in enumerate(tqdm(tokens, desc="ExecuTorch runtime", disable=not progress)):
        out = program.forward((torch.tensor([[int(token)]], dtype=torch.long), torch.tensor([position], dtype=torch.long)))
        rows.append(out[0].reshape(-1).float())
    return torch.stack(rows)


def mirror_executorch_activations(model: nn.Module) -> None:
    """Make our model quantize activations where ExecuTorch does, to measure the layout alone.

    Two placements differ from the paper's evaluation: ExecuTorch quantizes o_proj's input per token (not per
    head) and lm_head's input (8-bit per token); everything else is already the same.
    """
    from utils.quant import ActQuantizer

    arch = get_architecture(model)
    quant = model.spinquant_quant
    per_token = QuantSpec(quant.a_bits, quant.a_asym, -1, quant.a_clip_ratio)
    for layer in decoder_layers(model):
        getattr(layer.get_submodule(arch.attn), arch.o_proj).input_quantizer = ActQuantizer(per_token)
    head = model.get_submodule(arch.lm_head)
    quantizer = ActQuantizer(QuantSpec(8, True, -1))
    head.register_forward_pre_hook(lambda module, args: (quantizer(args[0]),))


@torch.no_grad()
def our_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Our model's next-token logits ``[len(tokens), vocab]`` for one sequence (float32, CPU)."""
    device = next(model.parameters()).device
    return model(input_ids=tokens.reshape(1, -1).to(device)).logits[0].float().cpu()


def compare_with_pte(
    model: nn.Module, pte: str | os.PathLike, tokens: torch.Tensor, pte_logits: torch.Tensor | None = None
) -> dict[str, Any]:
    """Next-token agreement of our model with the ``.pte`` on ``tokens`` (teacher forcing, one sequence)."""
    tokens = tokens.reshape(-1)
    theirs = pte_logits if pte_logits is not None else run_pte(pte, tokens.tolist())
    return _agreement(our_logits(model, tokens), theirs, tokens)


def _agreement(ours: torch.Tensor, theirs: torch.Tensor, tokens: torch.Tensor) -> dict[str, Any]:
    top_ours, top_theirs = ours.argmax(-1), theirs.argmax(-1)
    target = tokens[1:]
    top5 = ours.topk(min(5, ours.shape[-1]), dim=-1).indices
    nll = lambda logits: nn.functional.cross_entropy(logits[:-1], target).item()  # noqa: E731
    return {
        "tokens": int(tokens.numel()),
        "top1_agreement": (top_ours == top_theirs).float().mean().item(),
        "executorch_top1_in_our_top5": (top5 == top_theirs.unsqueeze(-1)).any(-1).float().mean().item(),
        "max_abs_logit_diff": (ours - theirs).abs().max().item(),
        "mean_abs_logit_diff": (ours - theirs).abs().mean().item(),
        "ours_ppl": math.exp(nll(ours)),
        "executorch_ppl": math.exp(nll(theirs)),
        "ours_next_token_accuracy": (top_ours[:-1] == target).float().mean().item(),
        "executorch_next_token_accuracy": (top_theirs[:-1] == target).float().mean().item(),
    }


# --------------------------------------------------------------------------------------------------------------
# Command line: make the .pte and check it against our model
# --------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m spinquant.export_executorch --checkpoint X.bin --qmodel Q --output_dir D [--tokens N]``."""
    from utils.io import setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(
        prog="spinquant-export-executorch",
        description="Build the .pte from an --export_to_et checkpoint with ExecuTorch's Llama export, run it in "
        "ExecuTorch's runtime and compare its next-token predictions with our quantized model on WikiText-2.",
    )
    parser.add_argument("--checkpoint", required=True, help="the file --export_to_et wrote (--save_qmodel_path)")
    parser.add_argument("--qmodel", default=None, help="our saved model (default: <checkpoint stem>_qmodel beside it)")
    parser.add_argument("--output_dir", default=None, help="where the .pte goes (default: beside the checkpoint)")
    parser.add_argument("--pte", default=None, help="use this .pte instead of exporting one")
    parser.add_argument("--tokens", type=int, default=256, help="WikiText-2 test tokens to compare on (0: skip)")
    parser.add_argument("--max_seq_length", type=int, default=None, help="KV-cache length of the .pte")
    parser.add_argument("--data_dir", default=None, help="local WikiText-2 mirror (e.g. ../shared/data)")
    parser.add_argument("--result_json", default=None, help="where the comparison goes (default: beside the .pte)")
    args = parser.parse_args(argv)
    try:
        result = run_export_and_compare(args)
    except (ExecuTorchExportError, FileNotFoundError, ModuleNotFoundError, RuntimeError, ValueError) as err:
        logger.error("%s", err)
        return 2
    print(json.dumps(result["comparison"], indent=2) if result.get("comparison") else result["pte"])
    return 0


def run_export_and_compare(args: argparse.Namespace) -> dict[str, Any]:
    from .qmodel import load_qmodel

    paths = export_paths(args.checkpoint)
    if not paths.checkpoint.is_file() or not paths.params.is_file():
        raise FileNotFoundError(f"--checkpoint: {paths.checkpoint} and {paths.params} must both exist")
    info = json.loads(paths.info.read_text()) if paths.info.is_file() else {}
    output_dir = Path(args.output_dir or paths.checkpoint.parent)
    max_seq_length = args.max_seq_length or max(args.tokens, 128)
    result: dict[str, Any] = {"checkpoint": str(paths.checkpoint), "max_seq_length": max_seq_length}
    if args.pte:
        pte = Path(args.pte)
    else:
        import time

        start = time.perf_counter()
        pte = export_pte(paths.checkpoint, output_dir, name=paths.checkpoint.name.split(".")[0] + ".pte",
                         max_seq_length=max_seq_length, metadata=info.get("metadata") or None)
        result["export_seconds"] = round(time.perf_counter() - start, 1)
    result["pte"] = str(pte)
    result["pte_bytes"] = pte.stat().st_size
    if args.tokens > 0:
        from utils.data import get_eval_windows

        qmodel = Path(args.qmodel) if args.qmodel else Path(info.get("qmodel", ""))
        model, tokenizer, _ = load_qmodel(qmodel, device="cpu")
        if tokenizer is None:
            raise FileNotFoundError(f"{qmodel} has no tokenizer to read WikiText-2 with")
        window = get_eval_windows(tokenizer, max(args.tokens, 2), split="test", data_dir=args.data_dir)[0]
        tokens = window[: args.tokens]
        theirs = run_pte(pte, tokens.tolist())
        result["comparison"] = {"paper_placement": compare_with_pte(model, pte, tokens, theirs)}
        mirror_executorch_activations(model)
        result["comparison"]["executorch_placement"] = compare_with_pte(model, pte, tokens, theirs)
    path = Path(args.result_json) if args.result_json else pte.with_suffix(".compare.json")
    write_json(path, result)
    logger.info("comparison written to %s", path)
    return result


if __name__ == "__main__":
    sys.exit(main())
