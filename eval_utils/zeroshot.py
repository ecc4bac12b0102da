"""Zero-shot accuracy with lm-eval (EleutherAI's lm-evaluation-harness, 0.4.x) on the in-memory quantized model.

The model object is handed to lm-eval's ``HFLM`` wrapper as is, so the scores come from exactly the network
that was rotated and quantized (fake-quantized activations and KV included).

Tasks: the paper's eight by default (:data:`PAPER_TASKS`). Each task keeps lm-eval's own definition -- prompt,
answer choices, metrics, evaluation split. Offline (``tasks_data_dir``), only where the data is read from
changes: for a task ``T`` evaluated by lm-eval on split ``S``, ``<tasks_data_dir>/T/S.jsonl`` (or
``S.parquet``) is read with the hub dataset's field layout, by overriding the task's ``dataset_path`` /
``dataset_kwargs`` through lm-eval's own config-override mechanism (a group whose members are the registered
tasks with overrides); no task YAML is copied. A task with no local file is skipped and reported as such.

"0-shot avg", as the paper's evaluation code (inherited from QuaRot) computes it: per task ``acc_norm`` where
lm-eval defines it (piqa, arc_easy, arc_challenge, hellaswag, openbookqa) and ``acc`` otherwise (winogrande,
boolq, social_iqa), then the plain mean over tasks. Values are fractions in [0, 1].

Differences from a stock ``lm_eval --model hf`` run: none in the tasks; the answer log-likelihoods are
normalised (log-softmax) in float32 rather than in the model's bf16/fp16, so near-ties are not decided by
round-off. Offline HellaSwag: the local file keeps each context whole in ``ctx_a`` (``ctx_b`` empty), which
lm-eval's preprocessing turns into the same prompt as the hub's split fields except in rare edge cases.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["PAPER_TASKS", "AVG_RULE", "parse_tasks", "local_task_overrides", "evaluate_zeroshot"]

PAPER_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "social_iqa", "openbookqa")
AVG_RULE = "mean over tasks of acc_norm where the task defines it, else acc (the paper's / QuaRot's rule)"
LOCAL_GROUP = "spinquant_local_tasks"
_LOCAL_FORMATS = (("jsonl", "json"), ("json", "json"), ("parquet", "parquet"))


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "zero-shot evaluation (--tasks) needs lm-eval: pip install 'lm_eval>=0.4.9,<0.5'"
        ) from err
    return lm_eval


@functools.lru_cache(maxsize=1)
def _task_manager():
    """lm-eval's task registry (indexing every YAML takes seconds, so it is built once per process)."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager()


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """``--tasks``: comma-separated lm-eval task names; None or empty means the paper's eight."""
    if spec is None:
        return list(PAPER_TASKS)
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    tasks = list(dict.fromkeys(name.strip() for name in names if name.strip()))
    return tasks or list(PAPER_TASKS)


def _registered_config(name: str) -> dict:
    entry = _task_manager().task_index.get(name)
    if entry is None:
        raise ValueError(f"--tasks: {name!r} is not an lm-eval task")
    return dict(entry.cfg or {})


def local_task_overrides(name: str, data_dir: str | Path) -> tuple[dict | None, str]:
    """Overrides making lm-eval's task ``name`` read its evaluation split from ``data_dir``.

    Returns ``(overrides, description)``; ``overrides`` is None (with the reason) when no local file exists.
    Only the evaluation split is kept: lm-eval otherwise falls back to train/validation documents for few-shot
    sampling even at zero shots, and those are not shipped.
    """
    config = _registered_config(name)
    split = config.get("test_split") or config.get("validation_split")
    if not split:
        return None, f"lm-eval's {name} has no test or validation split"
    folder = Path(data_dir) / name
    for suffix, builder in _LOCAL_FORMATS:
        path = folder / f"{split}.{suffix}"
        if path.is_file():
            overrides = {
                "task": name,
                "dataset_path": builder,
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {split: str(path.resolve())}},
                "training_split": None,
                "validation_split": split if split == config.get("validation_split") else None,
                "test_split": split if split == config.get("test_split") else None,
                "fewshot_split": None,
            }
            return overrides, str(path)
    return None, f"no local data: expected {folder / (split + '.jsonl')} (lm-eval evaluates {name} on {split!r})"


def _metric(results: dict, name: str) -> float | None:
    value = results.get(f"{name},none")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def evaluate_zeroshot(
    model: nn.Module,
    tokenizer,
    tasks: str | Sequence[str] | None = None,
    *,
    limit: int | None = None,
    batch_size: int | str = 16,
    data_dir: str | Path | None = None,
    return_samples: bool = False,
) -> dict:
    """Zero-shot accuracy of ``model`` on ``tasks``; see the module docstring for data and averaging.

    Returns ``{"tasks": {name: {acc, acc_stderr, acc_norm, acc_norm_stderr, metric, score, examples, data}},
    "skipped": {name: reason}, "avg": float | None, ...}``; with ``return_samples`` also lm-eval's per-example
    records (``"samples"``, not JSON-friendly) for inspection.
    """
    lm_eval = _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    names = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be a positive number of examples per task, got {limit}")
    manager = _task_manager()
    sources: dict[str, str] = {}
    skipped: dict[str, str] = {}
    specs: list = []
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise FileNotFoundError(f"--tasks_data_dir {str(data_dir)!r} is not a directory")
        members = []
        for name in names:
            overrides, described = local_task_overrides(name, data_dir)
            if overrides is None:
                logger.warning("zero-shot task %s skipped: %s", name, described)
                skipped[name] = described
            else:
                members.append(overrides)
                sources[name] = described
        if members:
            specs.append({"group": LOCAL_GROUP, "task": members})
    else:
        for name in names:
            _registered_config(name)  # fail early, naming --tasks
            sources[name] = "hub"
        specs.extend(names)

    result: dict = {
        "tasks": {},
        "skipped": skipped,
        "avg": None,
        "avg_rule": AVG_RULE,
        "limit": limit,
        "batch_size": batch_size,
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
    }
    if not specs:
        logger.warning("zero-shot: no task could be evaluated")
        return result

    loaded = manager.load(specs)["tasks"]
    was_training = model.training
    model.eval()
    try:
        # Log-softmax in float32 even for a bf16/fp16 model, so close answer choices are not ranked by round-off.
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype=torch.float32)
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(loaded.values()),
            num_fewshot=0,
            limit=limit,
            log_samples=return_samples,
            task_manager=manager,
        )
    finally:
        model.train(was_training)
    if output is None:  # non-zero ranks of a distributed run
        return result

    scores = []
    for name in names:
        if name in skipped:
            continue
        metrics = output["results"].get(name)
        if metrics is None:
            skipped[name] = "lm-eval returned no result"
            continue
        acc, acc_norm = _metric(metrics, "acc"), _metric(metrics, "acc_norm")
        metric = "acc_norm" if acc_norm is not None else "acc"
        score = acc_norm if acc_norm is not None else acc
        result["tasks"][name] = {
            "acc": acc,
            "acc_stderr": _metric(metrics, "acc_stderr"),
            "acc_norm": acc_norm,
            "acc_norm_stderr": _metric(metrics, "acc_norm_stderr"),
            "metric": metric,
            "score": score,
            "examples": int(output.get("n-samples", {}).get(name, {}).get("effective", metrics.get("sample_len", 0))),
            "data": sources.get(name, "hub"),
        }
        if score is not None:
            scores.append(score)
    result["avg"] = sum(scores) / len(scores) if scores else None
    if return_samples:
        result["samples"] = output.get("samples", {})
    summary = ", ".join(f"{n} {100 * t['score']:.2f}" for n, t in result["tasks"].items() if t["score"] is not None)
    logger.info("zero-shot (%s): %s", "limit %d" % limit if limit else "full", summary)
    return result
