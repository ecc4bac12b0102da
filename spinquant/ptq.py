"""PTQ entry point: load, rotate, quantize, evaluate WikiText-2 perplexity (``python -m spinquant.ptq``).

Prints ``wiki2 ppl is: X`` as the paper's code does and writes a JSON result (``config`` with every flag under
its command-line name, ``wiki2_ppl``, ``device``, ``timings`` in seconds per phase, and more).
"""

from __future__ import annotations

import datetime as _dt
import logging
import random
import sys
from pathlib import Path
from typing import Sequence

import torch

from eval_utils.gptq import gptq_config_from_args, gptq_quantize_model
from eval_utils.perplexity import evaluate_perplexity
from eval_utils.zeroshot import evaluate_zeroshot
from utils.args import parse_ptq_args
from utils.data import get_calibration_windows, get_eval_windows
from utils.io import PhaseTimer, describe_device, setup_logging, write_json

from .config import quant_config_from_args, rotation_config_from_args
from .model import load_model, pick_device
from .quantize import quantize_
from .rotation import rotate_

logger = logging.getLogger("spinquant.ptq")

__all__ = ["main", "run_ptq", "resolve_dtype"]


def resolve_dtype(bf16: bool, fp16: bool, device: torch.device) -> torch.dtype:
    """--bf16 / --fp16 as the paper; with neither, float16 on CUDA (the paper's default) and float32 on CPU."""
    if bf16:
        return torch.bfloat16
    if fp16:
        return torch.float16
    return torch.float16 if device.type == "cuda" else torch.float32


def _not_yet(args) -> str | None:
    if args.load_qmodel_path or args.save_qmodel_path or args.export_to_et:
        return "--load_qmodel_path / --save_qmodel_path / --export_to_et are not implemented yet"
    return None


def run_ptq(args) -> dict:
    """The PTQ pipeline for parsed arguments; returns the result dictionary (also written as JSON)."""
    problem = _not_yet(args)
    if problem:
        raise NotImplementedError(problem)
    timer = PhaseTimer()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    dtype = resolve_dtype(args.bf16, args.fp16, device)
    progress = not args.no_progress

    with timer.phase("load_model"):
        model, tokenizer = load_model(
            args.input_model,
            dtype=dtype,
            device=device,
            token=args.access_token,
            attn_implementation=args.attn_implementation,
        )
    with timer.phase("load_data"):
        windows = get_eval_windows(tokenizer, args.model_max_length, split=args.eval_split, data_dir=args.data_dir)
        if args.eval_windows > 0:
            windows = windows[: args.eval_windows]
    with timer.phase("rotate"):
        rotation_config = rotation_config_from_args(args)
        rotate_(model, rotation_config)
    # GPTQ (the paper's default for w_bits < 16) runs before the activation quantizers are installed.
    use_gptq = args.w_bits < 16 and not args.w_rtn
    gptq_summary = None
    if use_gptq:
        with timer.phase("load_calibration"):
            calibration = get_calibration_windows(
                tokenizer, args.nsamples, args.model_max_length, args.seed, split=args.calib_split,
                data_dir=args.data_dir,
            )
        with timer.phase("gptq"):
            gptq_summary = gptq_quantize_model(
                model, calibration, quant_config_from_args(args), gptq_config_from_args(args), device=device,
                progress=progress,
            )
    with timer.phase("quantize"):
        quant_config = quantize_(model, quant_config_from_args(args), weights=not use_gptq, progress=progress)
    with timer.phase("eval_ppl"):
        ppl = evaluate_perplexity(model, windows, batch_size=args.per_device_eval_batch_size, progress=progress)

    print(f"wiki2 ppl is: {ppl['ppl']}", flush=True)
    zeroshot = None
    if args.tasks is not None or args.tasks_data_dir:
        with timer.phase("eval_zeroshot"):
            zeroshot = evaluate_zeroshot(
                model,
                tokenizer,
                args.tasks or None,
                limit=args.limit,
                batch_size=args.lm_eval_batch_size,
                data_dir=args.tasks_data_dir,
            )
        if zeroshot["avg"] is not None:
            print(f"0-shot avg is: {100 * zeroshot['avg']:.2f} ({', '.join(zeroshot['tasks'])})", flush=True)
    result = {
        "config": vars(args),
        "resolved": {"quant": quant_config, "rotation": rotation_config, "dtype": str(dtype).removeprefix("torch.")},
        "wiki2_ppl": ppl["ppl"],
        "data_source": str(resolve_data_dir(args.data_dir) or "hub"),
        "ppl_eval": ppl,
        "weight_method": ("gptq" if use_gptq else "rtn") if args.w_bits < 16 else None,
        "gptq": gptq_summary,
        "zeroshot_avg": zeroshot["avg"] if zeroshot else None,
        "zeroshot": zeroshot,
        "device": describe_device(device),
        "timings": timer.as_dict(),
        "command": [sys.executable, "-m", "spinquant.ptq", *sys.argv[1:]],
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    path = Path(args.result_json) if args.result_json else Path(args.output_dir) / "ptq_result.json"
    write_json(path, result)
    logger.info("result written to %s (timings: %s)", path, result["timings"])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = parse_ptq_args(argv)
    try:
        run_ptq(args)
    except (NotImplementedError, FileNotFoundError, ValueError, ImportError) as err:
        logger.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
