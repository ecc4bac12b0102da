"""Rotation-learning entry point: learn R1/R2 with Cayley SGD, write R.bin (``python -m spinquant.optimize_rotation``).

Single process, ``torchrun`` data parallel (any number of processes; the global batch stays ``--global_batch_size``)
or FSDP (``--fsdp "full_shard auto_wrap"``). Writes (main process):

* ``R.bin`` (``--output_rotation_path``), the released-rotation format, atomically, then re-read and validated;
* ``train_log.jsonl`` and ``loss_curve.png`` under ``--logging_dir`` (default ``--output_dir``);
* ``checkpoint.pt`` under ``--output_dir`` (every ``--save_steps`` and at the end; ``--resume`` continues from it);
* a JSON summary (``--result_json``, default ``<output_dir>/optimize_rotation.json``): timings, tokens/s, peak
  memory, the split of a step between applying rotations and the plain forward/backward, losses.

Exit status: 0 done, 2 bad input (the message names the flag or file), 3 non-finite loss (last good rotations kept).
"""

from __future__ import annotations

import datetime as _dt
import logging
import random
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from train_utils.plots import plot_loss_curve
from train_utils.rotation_model import build_rotation_network
from train_utils.trainer import (
    CHECKPOINT_FILE,
    CURVE_FILE,
    NonFiniteLossError,
    RotationTrainer,
    TrainConfig,
    apply_fsdp,
    init_distributed,
    parse_fsdp_options,
)
from utils.args import parse_train_args
from utils.data import get_train_blocks
from utils.io import PhaseTimer, describe_device, setup_logging, write_json

from .config import quant_config_from_args, rotation_config_from_args
from .model import load_model
from .ptq import resolve_dtype
from .rotation import load_rotations, make_random_rotations, save_rotations

logger = logging.getLogger("spinquant.optimize_rotation")

__all__ = ["main", "run_optimize_rotation", "resolve_rotation_path"]

ROTATION_FILE = "R.bin"


def resolve_rotation_path(output_rotation_path: str | None, output_dir: str) -> Path:
    """``--output_rotation_path``: a file (``*.bin``/``*.pt``/``*.pth``) or a folder that gets R.bin (the paper)."""
    if not output_rotation_path:
        return Path(output_dir) / ROTATION_FILE
    path = Path(output_rotation_path).expanduser()
    if path.suffix in (".bin", ".pt", ".pth") and not path.is_dir():
        return path
    return path / ROTATION_FILE


def _resume_path(args) -> str | None:
    if args.resume_from_checkpoint:
        return args.resume_from_checkpoint
    if args.resume:
        candidate = Path(args.output_dir) / CHECKPOINT_FILE
        if candidate.is_file():
            return str(candidate)
        logger.warning("--resume: no checkpoint at %s, starting from step 0", candidate)
    return None


def run_optimize_rotation(args) -> dict:
    """Rotation learning for parsed arguments; returns the summary (also written as JSON by the main process)."""
    timer = PhaseTimer()
    context = init_distributed(args.device)
    if not context.is_main and not args.log_on_each_node:
        logging.getLogger().setLevel(logging.WARNING)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = context.device
    dtype = resolve_dtype(args.bf16, args.fp16, device)
    fsdp_options = parse_fsdp_options(args.fsdp)
    rotation_path = resolve_rotation_path(args.output_rotation_path, args.output_dir)
    rotation_config = rotation_config_from_args(args)
    quant_config = quant_config_from_args(args)
    if dtype == torch.float16:
        logger.warning("--fp16: no loss scaling is used; --bf16 True (the paper's setting) is safer")

    with timer.phase("load_model"):
        # Under FSDP each process loads on the CPU and fully_shard moves only its shards to the GPU.
        load_device = torch.device("cpu") if fsdp_options else device
        model, tokenizer = load_model(
            args.input_model,
            dtype=dtype,
            device=load_device,
            token=args.access_token,
            attn_implementation=args.attn_implementation,
        )
    with timer.phase("load_data"):
        blocks = get_train_blocks(
            tokenizer,
            args.model_max_length,
            n_blocks=args.max_steps * args.global_batch_size,
            split=args.calib_split,
            data_dir=args.data_dir,
            repeat=True,
        )
    with timer.phase("build_network"):
        if rotation_config.optimized_rotation_path:
            init = load_rotations(rotation_config.optimized_rotation_path, model)
            init_source = rotation_config.optimized_rotation_path
        else:
            init = make_random_rotations(model, rotation_config.mode, rotation_config.seed)
            init_source = f"random {rotation_config.mode} (seed {rotation_config.seed})"
        network = build_rotation_network(
            model,
            quant_config,
            init,
            fp32_had=rotation_config.fp32_had,
            online_hadamard=rotation_config.online_hadamard,
            center_embeddings=rotation_config.center_embeddings,
            cache_weights=bool(args.cache_rotated_weights) and not fsdp_options,
            gradient_checkpointing=bool(args.gradient_checkpointing),
            loss_chunk_tokens=args.loss_chunk_tokens,
        )
        wrapped = []
        if fsdp_options:
            layer_classes = (
                [n.strip() for n in args.fsdp_transformer_layer_cls_to_wrap.split(",") if n.strip()]
                if args.fsdp_transformer_layer_cls_to_wrap
                else None
            )
            wrapped = apply_fsdp(network, fsdp_options, layer_classes, context)
    logger.info(
        "training R1 %s and %d R2 (%s) on %d blocks of %d tokens from WikiText-2 %s; %s",
        tuple(network.rotations.r1.shape), len(network.rotations.r2), init_source, blocks.shape[0], blocks.shape[1],
        args.calib_split, f"FSDP {sorted(fsdp_options)} wrapping {wrapped}" if fsdp_options else
        f"{context.world_size} process(es), data parallel",
    )

    config = TrainConfig(
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_steps,
        momentum=args.momentum,
        cayley_iterations=args.cayley_iterations,
        cayley_qr_every=args.cayley_qr_every,
        cayley_orthogonality_tol=args.cayley_orthogonality_tol or None,
        max_grad_norm=args.max_grad_norm,
        global_batch_size=args.global_batch_size,
        per_device_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        output_dir=args.output_dir,
        logging_dir=args.logging_dir,
        resume_from_checkpoint=_resume_path(args),
        progress=not args.no_progress,
        fingerprint={
            "input_model": args.input_model,
            "model_max_length": args.model_max_length,
            "calib_split": args.calib_split,
            "global_batch_size": args.global_batch_size,
            "max_steps": args.max_steps,
            "learning_rate": args.learning_rate,
            "lr_scheduler_type": args.lr_scheduler_type,
            "dtype": str(dtype).removeprefix("torch."),
            "quant": asdict(network.quant),
        },
    )
    trainer = RotationTrainer(network, blocks, config, context)
    with timer.phase("train"):
        summary = trainer.train()

    result: dict = {}
    if context.is_main:
        with timer.phase("save"):
            save_rotations(network.rotations.state_as_rotations(), rotation_path)
            reloaded = load_rotations(rotation_path, network.model)
            saved = network.rotations.state_as_rotations()
            mismatch = max((reloaded[k].float() - saved[k]).abs().max().item() for k in saved)
            if mismatch != 0.0:
                raise RuntimeError(f"{rotation_path} does not read back as written (max difference {mismatch})")
            plot_loss_curve(trainer.records, config.log_dir / CURVE_FILE, title=f"{args.input_model} rotation learning")
        orthogonality = max(
            (m.double().T @ m.double() - torch.eye(m.shape[0], dtype=torch.float64)).abs().max().item()
            for m in saved.values()
        )
        result = {
            "config": vars(args),
            "resolved": {
                "quant": network.quant,
                "dtype": str(dtype).removeprefix("torch."),
                "init_rotations": init_source,
                "fsdp": sorted(fsdp_options),
                "fsdp_wrapped": wrapped,
            },
            "rotation_path": str(rotation_path),
            "train_log": str(trainer.log_path),
            "loss_curve": str(config.log_dir / CURVE_FILE),
            "checkpoint": str(trainer.checkpoint_path),
            "max_orthogonality_error": orthogonality,
            "training": summary,
            "device": describe_device(device),
            "timings": timer.as_dict(),
            "command": [sys.executable, "-m", "spinquant.optimize_rotation", *sys.argv[1:]],
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        result["wall_time_s"] = result["timings"]["total"]
        path = Path(args.result_json) if args.result_json else Path(args.output_dir) / "optimize_rotation.json"
        write_json(path, result)
        logger.info(
            "R.bin written to %s; loss %.4f -> %.4f; %.3f s/step; summary in %s",
            rotation_path, summary["loss_first"] or float("nan"), summary["loss_last"] or float("nan"),
            summary["step_time_s_mean"] or float("nan"), path,
        )
    context.barrier()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = parse_train_args(argv)
    try:
        run_optimize_rotation(args)
    except NonFiniteLossError as err:
        logger.error("%s", err)
        return 3
    except (NotImplementedError, FileNotFoundError, ValueError) as err:
        logger.error("%s", err)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
