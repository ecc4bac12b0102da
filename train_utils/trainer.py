"""The rotation-learning loop: batches, Cayley SGD steps, logs, checkpoints, resume, data parallel and FSDP.

One optimizer step (the paper's recipe, Hugging Face Trainer semantics):

1. set the learning rate of this step (cosine over ``max_steps`` by default, no warm-up);
2. compute the rotated, fake-quantized weights once (:meth:`RotationNetwork.step_weights`);
3. for each of the ``gradient_accumulation_steps`` micro-batches of ``per_device_batch_size`` blocks: forward,
   backward of ``loss_sum / tokens_of_the_global_batch`` (so the gradient is the mean over all tokens of the
   global batch, whatever the split into ranks and micro-batches);
4. sum the R1/R2 gradients and the loss over ranks (one all-reduce; only R1/R2 are trainable, so this is exact
   data parallelism without a DDP wrapper), stop on a non-finite loss or gradient;
5. clip the gradient norm to ``max_grad_norm`` (1.0, the Trainer's default the paper's runs used) and take a
   Cayley SGD step.

Global batch ``b`` of step ``s`` is blocks ``s*B .. s*B+B-1`` of the (in-order) training blocks, rank ``r`` taking
its contiguous share: the same blocks per step whatever the number of processes.

Timing of a step (``train_log.jsonl``): ``step_time_s`` from the first micro-batch to the end of the Cayley step;
``rotation_s`` the device time spent applying R1/R2 to the weights (with the per-step cache: rotating and
fake-quantizing them once plus folding their gradients into R1/R2; without it: every weight computation inside the
forward and the checkpoint recomputation, the backward through it not included); ``forward_backward_s`` the rest
of forward and backward; ``optimizer_s`` the all-reduce, clipping and Cayley step.

Outputs (main rank): ``train_log.jsonl`` (one JSON record per step) and ``loss_curve.png`` under ``logging_dir``;
``checkpoint.pt`` (rotations, optimizer state, step, data position) under ``output_dir`` every ``save_steps`` and
at the end; on a non-finite loss, ``R_last_good.bin`` and the checkpoint of the last good step before the error.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from spinquant.rotation import save_rotations
from utils.io import atomic_write, torch_save_atomic

from .cayley_sgd import CayleySGD
from .rotation_model import CheckpointedLayer, RotationNetwork

logger = logging.getLogger(__name__)

__all__ = [
    "TrainConfig",
    "DistributedContext",
    "init_distributed",
    "NonFiniteLossError",
    "learning_rate_at",
    "SCHEDULERS",
    "FSDP_OPTIONS",
    "parse_fsdp_options",
    "apply_fsdp",
    "RotationTrainer",
    "CHECKPOINT_FORMAT",
]

SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
CHECKPOINT_FORMAT = "spinquant-rotation-checkpoint-v1"
LOG_FILE = "train_log.jsonl"
CURVE_FILE = "loss_curve.png"
CHECKPOINT_FILE = "checkpoint.pt"
LAST_GOOD_FILE = "R_last_good.bin"


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN/inf; the last good rotations were saved first."""


# ----------------------------------------------------------------------------------------------------------------
# Configuration and schedule
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """How to train (the paper's defaults). ``gradient_accumulation_steps = 0`` derives it from the global batch."""

    max_steps: int = 100
    learning_rate: float = 1.5
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    momentum: float = 0.0
    cayley_iterations: int = 5
    cayley_qr_every: int = 0
    cayley_orthogonality_tol: float | None = 1e-4
    max_grad_norm: float = 1.0
    global_batch_size: int = 8
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 0
    logging_steps: int = 1
    save_steps: int = 25
    output_dir: str = "outputs"
    logging_dir: str | None = None
    resume_from_checkpoint: str | None = None
    progress: bool = True
    # What a checkpoint must agree on to be resumed (model, data, quantization, schedule...).
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.lr_scheduler_type not in SCHEDULERS:
            raise ValueError(f"--lr_scheduler_type must be one of {SCHEDULERS}, got {self.lr_scheduler_type!r}")
        if self.max_steps < 1:
            raise ValueError(f"--max_steps must be at least 1, got {self.max_steps}")
        if self.per_device_batch_size < 1:
            raise ValueError(f"--per_device_train_batch_size must be at least 1, got {self.per_device_batch_size}")
        if self.global_batch_size < 1:
            raise ValueError(f"--global_batch_size must be at least 1, got {self.global_batch_size}")

    @property
    def log_dir(self) -> Path:
        return Path(self.logging_dir or self.output_dir)


def learning_rate_at(step: int, base: float, kind: str, max_steps: int, warmup_steps: int = 0) -> float:
    """The Hugging Face schedules: learning rate of the step with 0-based index ``step``."""
    if kind == "constant":
        return base
    if step < warmup_steps:
        return base * step / max(1, warmup_steps)
    if kind == "constant_with_warmup":
        return base
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if kind == "cosine":
        return base * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if kind == "linear":
        return base * max(0.0, 1.0 - progress)
    raise ValueError(f"unknown scheduler {kind!r}")


# ----------------------------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DistributedContext:
    """This process's place in a ``torchrun`` job (world size 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_distributed(requested_device: str | None = None) -> DistributedContext:
    """Join the ``torchrun`` process group if there is one (NCCL on CUDA, gloo on CPU) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested_device:
        device = torch.device(requested_device)
        if device.type == "cuda" and device.index is None and world_size > 1:
            device = torch.device("cuda", local_rank)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


FSDP_OPTIONS = ("full_shard", "shard_grad_op", "auto_wrap")


def parse_fsdp_options(value: str | list[str] | None) -> set[str]:
    """``--fsdp "full_shard auto_wrap"`` (Hugging Face syntax) -> {"full_shard", "auto_wrap"}; empty: no FSDP."""
    if not value:
        return set()
    words = value.split() if isinstance(value, str) else [w for item in value for w in item.split()]
    options = {w.strip().lower() for w in words if w.strip()}
    unsupported = sorted(options - set(FSDP_OPTIONS))
    if unsupported:
        raise ValueError(
            f"--fsdp: option(s) {', '.join(unsupported)} are not supported; use {', '.join(FSDP_OPTIONS)}"
        )
    if {"full_shard", "shard_grad_op"} <= options:
        raise ValueError("--fsdp: full_shard and shard_grad_op are exclusive")
    if not options & {"full_shard", "shard_grad_op"}:
        options.add("full_shard")
    return options


def apply_fsdp(
    network: RotationNetwork, options: set[str], layer_classes: list[str] | None, context: DistributedContext
) -> list[str]:
    """Shard the frozen model with FSDP2 (``fully_shard``); R1/R2 stay whole on every rank, on its device (their
    gradients are all-reduced by the trainer). Returns the names of the layer classes wrapped as their own units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if network.cache_weights:
        raise ValueError("FSDP needs the rotated weights computed on the fly (cache_weights=False)")
    if not dist.is_initialized():  # FSDP in a single process (no torchrun): a one-member group
        backend = "nccl" if context.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(context.device.type, (context.world_size,))
    reshard = "shard_grad_op" not in options
    default = type(network.decoder_layer_modules()[0]).__name__
    names = layer_classes or [default]
    wrapped: list[str] = []
    if "auto_wrap" in options:
        outer = {id(m.layer): m for m in network.model.modules() if isinstance(m, CheckpointedLayer)}
        targets = [m for m in network.model.modules() if type(m).__name__ in names]
        if not targets:
            raise ValueError(
                f"--fsdp_transformer_layer_cls_to_wrap {','.join(names)}: no module of that class in the model "
                f"(its decoder layers are {default})"
            )
        for module in targets:
            # The checkpoint wrapper is the unit, so FSDP's gather hooks stay outside the recomputed region.
            fully_shard(outer.get(id(module), module), mesh=mesh, reshard_after_forward=reshard)
        wrapped = sorted({type(m).__name__ for m in targets})
    fully_shard(network, mesh=mesh, reshard_after_forward=reshard, ignored_params=set(network.trainable_parameters()))
    network.rotations.to(context.device)
    network.set_timer_device(context.device)
    return wrapped


# ----------------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RotationTrainer:
    """Runs Cayley SGD on a :class:`RotationNetwork` over in-order training blocks ``[n, seqlen]``."""

    def __init__(
        self,
        network: RotationNetwork,
        blocks: torch.Tensor,
        config: TrainConfig,
        context: DistributedContext | None = None,
    ) -> None:
        self.network = network
        self.blocks = blocks
        self.config = config
        self.context = context or DistributedContext(device=network.rotations.r1.device)
        per_rank = config.per_device_batch_size * self.context.world_size
        if config.gradient_accumulation_steps > 0:
            self.accumulation = config.gradient_accumulation_steps
            if per_rank * self.accumulation != config.global_batch_size:
                raise ValueError(
                    f"--per_device_train_batch_size {config.per_device_batch_size} x --gradient_accumulation_steps "
                    f"{self.accumulation} x {self.context.world_size} processes = {per_rank * self.accumulation}, "
                    f"but --global_batch_size is {config.global_batch_size}"
                )
        else:
            if config.global_batch_size % per_rank:
                raise ValueError(
                    f"--global_batch_size {config.global_batch_size} is not a multiple of "
                    f"--per_device_train_batch_size {config.per_device_batch_size} x {self.context.world_size} "
                    "processes"
                )
            self.accumulation = config.global_batch_size // per_rank
        if blocks.dim() != 2 or blocks.shape[0] == 0:
            raise ValueError(f"expected training blocks [n, seqlen], got {tuple(blocks.shape)}")
        self.seqlen = blocks.shape[1]
        self.global_tokens = config.global_batch_size * (self.seqlen - 1)
        self.params = network.trainable_parameters()
        self.optimizer = CayleySGD(
            self.params,
            lr=config.learning_rate,
            momentum=config.momentum,
            iterations=config.cayley_iterations,
            qr_every=config.cayley_qr_every,
            orthogonality_tol=config.cayley_orthogonality_tol,
        )
        self.start_step = 0
        self.records: list[dict[str, Any]] = []

    # -- data ------------------------------------------------------------------------------------------------------

    def batch_indices(self, step: int, micro: int, rank: int | None = None) -> list[int]:
        """Block indices of micro-batch ``micro`` of ``rank`` at 0-based ``step``."""
        rank = self.context.rank if rank is None else rank
        per_device = self.config.per_device_batch_size
        first = step * self.config.global_batch_size + (rank * self.accumulation + micro) * per_device
        return [(first + j) % self.blocks.shape[0] for j in range(per_device)]

    # -- checkpoints -----------------------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.config.output_dir) / CHECKPOINT_FILE

    @property
    def log_path(self) -> Path:
        return self.config.log_dir / LOG_FILE

    def save_checkpoint(self, completed_steps: int) -> Path | None:
        if not self.context.is_main:
            return None
        payload = {
            "format": CHECKPOINT_FORMAT,
            "step": completed_steps,
            "data_position": completed_steps * self.config.global_batch_size,
            "rotations": self.network.rotations.state_as_rotations(),
            "optimizer": self.optimizer.state_dict(),
            "fingerprint": self.config.fingerprint,
        }
        return torch_save_atomic(payload, self.checkpoint_path)

    def resume(self, path: str | os.PathLike) -> int:
        """Load rotations, optimizer state and position from a checkpoint; returns the completed step count."""
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / CHECKPOINT_FILE
        if not file.is_file():
            raise FileNotFoundError(f"--resume_from_checkpoint: {str(file)!r} does not exist")
        state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"--resume_from_checkpoint: {str(file)!r} is not a rotation-learning checkpoint")
        saved = state.get("fingerprint", {})
        for key, value in self.config.fingerprint.items():
            if key in saved and saved[key] != value:
                raise ValueError(
                    f"--resume_from_checkpoint: the checkpoint was made with {key}={saved[key]!r}, this run has "
                    f"{key}={value!r}"
                )
        self.network.rotations.load_rotations(state["rotations"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_step = int(state["step"])
        if self.start_step > self.config.max_steps:
            raise ValueError(
                f"--resume_from_checkpoint: the checkpoint is at step {self.start_step}, past --max_steps "
                f"{self.config.max_steps}"
            )
        self.records = [r for r in self._read_log() if r.get("step", 0) <= self.start_step]
        if self.context.is_main:
            self._rewrite_log()
        logger.info("resumed from %s at step %d", file, self.start_step)
        return self.start_step

    def _read_log(self) -> list[dict[str, Any]]:
        if not self.log_path.is_file():
            return []
        with open(self.log_path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def _rewrite_log(self) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as handle:
                for record in self.records:
                    handle.write(json.dumps(record) + "\n")

        atomic_write(self.log_path, write)

    def _append_log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.context.is_main:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    # -- one step --------------------------------------------------------------------------------------------------

    def _reduce(self, local_loss: torch.Tensor) -> torch.Tensor:
        """Sum R1/R2 gradients and the loss over ranks in one all-reduce; returns the global mean loss."""
        grads = []
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(param.grad.reshape(-1))
        flat = torch.cat(grads + [local_loss.reshape(1).to(grads[0].dtype)])
        self.context.all_reduce_sum(flat)
        offset = 0
        for param in self.params:
            n = param.numel()
            param.grad.copy_(flat[offset : offset + n].view_as(param))
            offset += n
        return flat[-1] / self.global_tokens

    def _fail(self, step: int, what: str) -> None:
        kept = ""
        if self.context.is_main:
            last_good = Path(self.config.output_dir) / LAST_GOOD_FILE
            save_rotations(self.network.rotations.state_as_rotations(), last_good)
            self.save_checkpoint(step)
            kept = f"; the rotations after step {step} are kept in {last_good} (checkpoint {self.checkpoint_path})"
        raise NonFiniteLossError(
            f"step {step + 1}: {what}{kept}. Try a lower --learning_rate or check the model in float32"
        )

    def train_step(self, step: int) -> dict[str, Any]:
        config, device = self.config, self.context.device
        lr = learning_rate_at(step, config.learning_rate, config.lr_scheduler_type, config.max_steps, config.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self.network.rotation_timer.collect()
        _sync(device)
        start = time.perf_counter()
        local_loss = torch.zeros((), dtype=torch.float32, device=device)
        with self.network.step_weights():
            for micro in range(self.accumulation):
                ids = self.blocks[self.batch_indices(step, micro)].to(device, non_blocking=True)
                loss_sum, _ = self.network(ids)
                (loss_sum / self.global_tokens).backward()
                local_loss += loss_sum.detach()
        _sync(device)
        after_backward = time.perf_counter()
        rotation_seconds = self.network.rotation_timer.collect()

        loss = self._reduce(local_loss).item()
        if not math.isfinite(loss):
            self._fail(step, f"the loss is {loss}")
        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm).item()
        if not math.isfinite(grad_norm):
            self._fail(step, f"the gradient norm is {grad_norm}")
        self.optimizer.step()
        if not all(torch.isfinite(p).all() for p in self.params):
            raise NonFiniteLossError(f"step {step + 1}: the Cayley update produced non-finite rotations")
        _sync(device)
        end = time.perf_counter()

        step_seconds = end - start
        record: dict[str, Any] = {
            "step": step + 1,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "cayley_step_size": max(self.optimizer.last_step_sizes or [0.0]),
            "step_time_s": step_seconds,
            "tokens_per_s": config.global_batch_size * self.seqlen / step_seconds,
            "forward_backward_s": after_backward - start - rotation_seconds,
            "rotation_s": rotation_seconds,
            "optimizer_s": end - after_backward,
        }
        if self.optimizer.last_orthogonality:
            record["orthogonality_error"] = max(self.optimizer.last_orthogonality)
        if device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return record

    # -- the loop --------------------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Train from :attr:`start_step` to ``max_steps``; returns timing and loss statistics."""
        config = self.config
        if config.resume_from_checkpoint:
            self.resume(config.resume_from_checkpoint)
        else:  # a fresh run starts a fresh log
            self.start_step, self.records = 0, []
            if self.context.is_main:
                self._rewrite_log()
        self.network.train()
        bar = tqdm(
            total=config.max_steps,
            initial=self.start_step,
            desc="rotation learning",
            disable=not (config.progress and self.context.is_main),
        )
        started = time.perf_counter()
        new_records: list[dict[str, Any]] = []
        try:
            for step in range(self.start_step, config.max_steps):
                record = self.train_step(step)
                self._append_log(record)
                new_records.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.3g}")
                if (step + 1) % config.logging_steps == 0 or step + 1 == config.max_steps:
                    logger.info(
                        "step %d/%d loss %.4f lr %.4g grad_norm %.4g step %.2fs (%.0f tokens/s)",
                        step + 1, config.max_steps, record["loss"], record["lr"], record["grad_norm"],
                        record["step_time_s"], record["tokens_per_s"],
                    )
                if config.save_steps > 0 and (step + 1) % config.save_steps == 0 and step + 1 < config.max_steps:
                    self.save_checkpoint(step + 1)
        finally:
            bar.close()
        self.save_checkpoint(config.max_steps)
        self.context.barrier()
        return self.summarize(new_records, time.perf_counter() - started)

    def summarize(self, new_records: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
        steps = [r["step_time_s"] for r in new_records]
        later = steps[1:] or steps

        def mean(key: str, rows: list[dict[str, Any]]) -> float | None:
            values = [r[key] for r in rows if r.get(key) is not None]
            return sum(values) / len(values) if values else None

        rows_after_first = new_records[1:] or new_records
        step_mean = sum(later) / len(later) if later else None
        rotation = mean("rotation_s", rows_after_first)
        summary: dict[str, Any] = {
            "steps_run": len(new_records),
            "start_step": self.start_step,
            "max_steps": self.config.max_steps,
            "train_time_s": seconds,
            "step_time_s_mean": step_mean,
            "step_time_s_median": statistics.median(later) if later else None,
            "first_step_time_s": steps[0] if steps else None,
            "tokens_per_step": self.config.global_batch_size * self.seqlen,
            "tokens_per_s": (self.config.global_batch_size * self.seqlen / step_mean) if step_mean else None,
            "rotation_s_per_step": rotation,
            "forward_backward_s_per_step": mean("forward_backward_s", rows_after_first),
            "optimizer_s_per_step": mean("optimizer_s", rows_after_first),
            "rotation_fraction_of_step": (rotation / step_mean) if (rotation is not None and step_mean) else None,
            "loss_first": new_records[0]["loss"] if new_records else None,
            "loss_last": new_records[-1]["loss"] if new_records else None,
            "cayley_retractions": self.optimizer.retractions,
            "world_size": self.context.world_size,
            "global_batch_size": self.config.global_batch_size,
            "per_device_batch_size": self.config.per_device_batch_size,
            "gradient_accumulation_steps": self.accumulation,
            "cache_weights": self.network.cache_weights,
            "config": asdict(self.config),
            "note": "step statistics exclude the first step (warm-up) when there is more than one",
        }
        device = self.context.device
        if device.type == "cuda":
            summary["peak_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            summary["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        return summary
