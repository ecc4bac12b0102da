"""PTQ entry point: load, rotate, quantize, evaluate WikiText-2 perplexity (``python -m spinquant.ptq``).

Prints ``wiki2 ppl is: X`` as the paper's code does and writes a JSON result (``config`` with every flag under
its command-line name, ``wiki2_ppl``, ``device``, ``timings`` in seconds per phase, and more).
"""

from __future__ import annotations

import copy
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
from utils.data import get_calibration_windows, get_eval_windows, resolve_data_dir
from utils.io import PhaseTimer, describe_device, setup_logging, write_json

from .config import quant_config_from_args, rotation_config_from_args
from .export_executorch import (
    check_export_config,
    pad_mlp_for_executorch,
    quantize_embeddings_for_executorch,
    save_executorch_checkpoint,
)
from .model import kv_shape, load_model, pick_device
from .qmodel import load_qmodel, save_qmodel
from .quantize import quantize_, quantize_weights_rtn
from .rotation import rotate_

logger = logging.getLogger("spinquant.ptq")

__all__ = ["main", "run_ptq", "resolve_dtype", "PTQCache"]


def resolve_dtype(bf16: bool, fp16: bool, device: torch.device) -> torch.dtype:
    """--bf16 / --fp16 as the paper; with neither, float16 on CUDA (the paper's default) and float32 on CPU."""
    if bf16:
        return torch.bfloat16
    if fp16:
        return torch.float16
    return torch.float16 if device.type == "cuda" else torch.float32


def _check_save_load_flags(args) -> None:
    """Fail before any work on flags that cannot go together."""
    if args.load_qmodel_path and args.save_qmodel_path:
        raise ValueError("--load_qmodel_path and --save_qmodel_path are exclusive: the loaded model is already saved")
    if args.export_to_et:
        if args.load_qmodel_path:
            raise ValueError("--export_to_et runs with quantization, not with --load_qmodel_path")
        check_export_config(quant_config_from_args(args), rotation_config_from_args(args))


def _input_model_config(args):
    """The config of --input_model, to check a loaded file against (None, with a warning, if unreadable)."""
    from transformers import AutoConfig

    from .model import _local_folder, resolve_model_source

    try:
        folder = _local_folder(resolve_model_source(args.input_model), args.access_token)
        return AutoConfig.from_pretrained(folder, token=args.access_token)
    except (OSError, ValueError) as err:
        logger.warning("cannot read the config of --input_model %s to check the loaded file against it: %s",
                       args.input_model, err)
        return None


def _load_saved(args, device: torch.device, dtype: torch.dtype):
    """--load_qmodel_path: the saved model, checked against --input_model and the quantization flags."""
    from .model import load_tokenizer

    model, tokenizer, info = load_qmodel(
        args.load_qmodel_path, device=device, dtype=dtype, attn_implementation=args.attn_implementation,
        quant=quant_config_from_args(args), rotation=rotation_config_from_args(args),
        model_config=_input_model_config(args),
    )
    if tokenizer is None:
        tokenizer = load_tokenizer(args.input_model, token=args.access_token)
    return model, tokenizer


def _save_outputs(args, model, tokenizer, padded: dict | None) -> dict | None:
    """--save_qmodel_path (our format), or with --export_to_et ExecuTorch's checkpoint plus ours beside it."""
    if not args.save_qmodel_path:
        return None
    extra = {"original_model_config": {"intermediate_size": padded["from"]}} if padded else {}
    if not args.export_to_et:
        return {"qmodel": str(save_qmodel(model, args.save_qmodel_path, tokenizer, args.input_model, extra))}
    target = Path(args.save_qmodel_path)
    qmodel = target.with_name(target.name.split(".")[0] + "_qmodel")
    save_qmodel(model, qmodel, tokenizer, args.input_model, extra)
    paths = save_executorch_checkpoint(
        model, target, tokenizer, extra={"qmodel": str(qmodel), "padded_intermediate": padded}
    )
    return {"executorch_checkpoint": str(paths.checkpoint), "executorch_params": str(paths.params),
            "executorch_info": str(paths.info), "qmodel": str(qmodel), "padded_intermediate": padded}


class PTQCache:
    """What in-process runs of :func:`run_ptq` can share (the experiment driver runs dozens of cells in a row).

    * the freshly loaded model (each run works on a deep copy) and its tokenizer;
    * tokenized evaluation and calibration windows;
    * the model after rotation and weight quantization (RTN or GPTQ), keyed by every flag that shapes it. Weight
      quantization does not depend on the activation/KV flags (GPTQ calibrates with activations in full precision,
      as the paper's code), so the cells of one row of the paper's table quantize the weights once. At most
      ``max_weight_entries`` such models are kept (least recently used dropped).
    """

    def __init__(self, max_weight_entries: int = 2) -> None:
        self.models: dict[tuple, tuple] = {}
        self.windows: dict[tuple, list] = {}
        self.weights: dict[tuple, tuple] = {}
        self.max_weight_entries = max_weight_entries
        self.hits: dict[str, int] = {"model": 0, "windows": 0, "weights": 0}

    def remember_weights(self, key: tuple, model, summary) -> None:
        self.weights.pop(key, None)
        self.weights[key] = (copy.deepcopy(model), summary)
        while len(self.weights) > self.max_weight_entries:
            self.weights.pop(next(iter(self.weights)))

    def recall_weights(self, key: tuple):
        if key not in self.weights:
            return None
        self.weights[key] = self.weights.pop(key)  # most recently used last
        self.hits["weights"] += 1
        model, summary = self.weights[key]
        return copy.deepcopy(model), summary


def _weights_key(args, dtype: torch.dtype, device: torch.device, use_gptq: bool) -> tuple:
    """Every flag that shapes the model up to (and including) weight quantization."""
    names = (
        "input_model", "attn_implementation", "rotate", "rotate_mode", "rotation_seed", "seed", "fp32_had",
        "online_hadamard", "optimized_rotation_path", "center_embeddings", "export_to_et", "w_bits", "w_groupsize",
        "w_asym", "w_clip", "int8_down_proj",
    )
    key = tuple((name, getattr(args, name, None)) for name in names)
    if args.optimized_rotation_path:  # a re-learned R.bin under the same path must not hit a stale entry
        path = Path(args.optimized_rotation_path)
        key += (("rotation_mtime", path.stat().st_mtime_ns if path.exists() else None),)
    if use_gptq:
        key += tuple((name, getattr(args, name)) for name in ("nsamples", "percdamp", "act_order", "calib_split",
                                                              "model_max_length", "data_dir"))
    return key + (("dtype", str(dtype)), ("device", str(device)), ("gptq", use_gptq))


def _cached(store: dict, key: tuple, make, cache: PTQCache | None, what: str):
    if cache is None:
        return make()
    if key in store:
        cache.hits[what] += 1
    else:
        store[key] = make()
    return store[key]


def run_ptq(args, cache: PTQCache | None = None) -> dict:
    """The PTQ pipeline for parsed arguments; returns the result dictionary (also written as JSON).

    ``cache`` (optional) shares loaded models, data and quantized weights between in-process runs.
    """
    _check_save_load_flags(args)
    timer = PhaseTimer()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    dtype = resolve_dtype(args.bf16, args.fp16, device)
    progress = not args.no_progress
    use_gptq = args.w_bits < 16 and not args.w_rtn and not args.load_qmodel_path
    cacheable = cache is not None and not args.load_qmodel_path and not args.save_qmodel_path
    weights_key = _weights_key(args, dtype, device, use_gptq) if cacheable else None
    recalled = cache.recall_weights(weights_key) if cacheable else None

    with timer.phase("load_model"):
        if args.load_qmodel_path:
            model, tokenizer = _load_saved(args, device, dtype)
        elif cacheable:
            model_key = (args.input_model, str(dtype), str(device), args.attn_implementation)
            pristine, tokenizer = _cached(cache.models, model_key, lambda: load_model(
                args.input_model, dtype=dtype, device=device, token=args.access_token,
                attn_implementation=args.attn_implementation,
            ), cache, "model")
            model = recalled[0] if recalled else copy.deepcopy(pristine)
        else:
            model, tokenizer = load_model(
                args.input_model,
                dtype=dtype,
                device=device,
                token=args.access_token,
                attn_implementation=args.attn_implementation,
            )
    with timer.phase("load_data"):
        windows_key = ("eval", args.input_model, args.model_max_length, args.eval_split, args.data_dir)
        windows = _cached(cache.windows if cache else {}, windows_key, lambda: get_eval_windows(
            tokenizer, args.model_max_length, split=args.eval_split, data_dir=args.data_dir), cache, "windows")
        if args.eval_windows > 0:
            windows = windows[: args.eval_windows]
    rotation_config = rotation_config_from_args(args)
    padded = None
    gptq_summary = None
    if recalled:  # rotated and weight-quantized already (same flags as an earlier run of this process)
        gptq_summary = recalled[1]
        logger.info("reusing the rotated, weight-quantized model of an earlier run with the same flags")
    else:
        # ExecuTorch's native R4 needs a power-of-two intermediate size: pad the MLP (exactly) before rotating.
        padded = pad_mlp_for_executorch(model) if args.export_to_et else None
        with timer.phase("rotate"):
            if not args.load_qmodel_path:  # a loaded model is rotated already
                rotate_(model, rotation_config)
        if args.export_to_et:  # 8-bit embedding and lm_head, before GPTQ as the paper's code
            quantize_embeddings_for_executorch(model, clip_search=args.w_clip)
        # GPTQ (the paper's default for w_bits < 16) runs before the activation quantizers are installed.
        if use_gptq:
            with timer.phase("load_calibration"):
                calibration_key = ("calib", args.input_model, args.nsamples, args.model_max_length, args.seed,
                                   args.calib_split, args.data_dir)
                calibration = _cached(cache.windows if cache else {}, calibration_key, lambda: get_calibration_windows(
                    tokenizer, args.nsamples, args.model_max_length, args.seed, split=args.calib_split,
                    data_dir=args.data_dir,
                ), cache, "windows")
            with timer.phase("gptq"):
                gptq_summary = gptq_quantize_model(
                    model, calibration, quant_config_from_args(args), gptq_config_from_args(args), device=device,
                    progress=progress,
                )
        elif args.w_bits < 16 and not args.load_qmodel_path:
            with timer.phase("quantize_weights"):
                head_dim = kv_shape(model.config)[2]
                quantize_weights_rtn(model, quant_config_from_args(args).for_head_dim(head_dim), progress=progress)
        if cacheable:
            cache.remember_weights(weights_key, model, gptq_summary)
    with timer.phase("quantize"):
        # Weights are done above (RTN or GPTQ) or loaded; this installs the activation, K and V quantizers.
        quant_config = quantize_(model, quant_config_from_args(args), weights=False, progress=progress)
    with timer.phase("save"):
        saved = _save_outputs(args, model, tokenizer, padded)
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
        "reused_weights": bool(recalled),
        "saved": saved,
        "loaded_from": args.load_qmodel_path,
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
