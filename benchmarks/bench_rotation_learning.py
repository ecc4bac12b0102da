"""Rotation-learning benchmarks that need code rather than the command line (issues 3 and 7).

    python benchmarks/bench_rotation_learning.py random-model --out OUT.json [--steps 3] [--per_device_batch 8]
        [--fsdp]
    torchrun --nproc_per_node 2 benchmarks/bench_rotation_learning.py random-model --out OUT.json [--fsdp]
    python benchmarks/bench_rotation_learning.py merge --out OUT.json IN.json ...

``random-model``: a LLaMA-2-7B-shaped model (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000)
with random bf16 weights, built from a config in code, learns R1/R2 at W4A4KV4 (``--w_clip``, asymmetric A/K/V,
K/V groups of 128) on random tokens, global batch 8 x 2048, with exactly the training code of
``spinquant.optimize_rotation`` (rotation network, trainer, Cayley SGD). It records the set-up time, per-step time
and its split, peak GPU memory, and whether 100 steps fit one GPU (memory: peak reserved below the card's memory;
time: projected from the measured steps). On an out-of-memory error the per-device batch is halved (gradient
accumulation keeps the global batch at 8) and the attempt is recorded.

With ``--fsdp`` the frozen model is sharded with FSDP2 exactly as ``--fsdp "full_shard auto_wrap"`` does in
``spinquant.optimize_rotation`` (each decoder layer its own unit, rotated weights computed on every forward); under
``torchrun`` the processes split the global batch (data parallel, or FSDP with ``--fsdp``) and rank 0 writes the
JSON, with the peak memory of every rank.

``merge``: several result JSON files into one list (keeps the number of files a GPU run returns small), dropping
the per-window NLL lists of perplexity results.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from spinquant.config import QuantConfig  # noqa: E402
from spinquant.rotation import make_random_rotations  # noqa: E402
from train_utils.rotation_model import build_rotation_network  # noqa: E402
from train_utils.trainer import RotationTrainer, TrainConfig, apply_fsdp, init_distributed  # noqa: E402
from utils.io import describe_device, setup_logging, write_json  # noqa: E402

LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    use_cache=False,
)
W4A4KV4 = QuantConfig(
    w_bits=4, w_clip=True, a_bits=4, a_asym=True, k_bits=4, k_asym=True, k_groupsize=128, v_bits=4, v_asym=True,
    v_groupsize=128,
)


def _shape(args: argparse.Namespace) -> dict:
    shape = dict(LLAMA2_7B, num_hidden_layers=args.layers)
    if args.hidden:  # a scaled-down dry run of the same code path
        heads = max(1, args.hidden // 128)
        shape.update(hidden_size=args.hidden, num_attention_heads=heads, num_key_value_heads=heads)
    if args.intermediate:
        shape["intermediate_size"] = args.intermediate
    return shape


def _random_llama(device: torch.device, shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    return model.eval()


def _gather_peaks(context, peaks: tuple) -> list[tuple]:
    """Every rank's peak-memory figures (rank order) -- they differ per rank under FSDP."""
    if not context.distributed:
        return [peaks]
    import torch.distributed as dist

    values: list = [None] * context.world_size
    dist.all_gather_object(values, peaks)
    return values


def random_model(args: argparse.Namespace) -> int:
    context = init_distributed(args.device)
    device = context.device
    mode = "FSDP full_shard auto_wrap" if args.fsdp else ("data parallel" if context.distributed else "one process")
    result: dict = {
        "what": f"LLaMA-2-7B-shaped random bf16 model, W4A4KV4 rotation learning, global batch 8 x {args.seqlen}, "
        f"{context.world_size} process(es), {mode}",
        "config": _shape(args),
        "quant": W4A4KV4,
        "device": describe_device(device),
        "world_size": context.world_size,
        "fsdp": bool(args.fsdp),
        "attempts": [],
    }
    start = time.perf_counter()
    model = _random_llama(device, _shape(args))
    result["parameters_billion"] = sum(p.numel() for p in model.parameters()) / 1e9
    result["build_model_s"] = time.perf_counter() - start
    start = time.perf_counter()
    rotations = make_random_rotations(model, "hadamard", 0)
    network = build_rotation_network(model, W4A4KV4, rotations, cache_weights=not (args.no_cache or args.fsdp))
    if args.fsdp:
        result["fsdp_wrapped"] = apply_fsdp(network, {"full_shard", "auto_wrap"}, None, context)
    if device.type == "cuda":
        torch.cuda.synchronize()
    result["build_network_s"] = time.perf_counter() - start
    if device.type == "cuda":
        result["memory_after_setup_gib"] = torch.cuda.memory_allocated(device) / 2**30
    blocks = torch.randint(0, LLAMA2_7B["vocab_size"], ((args.steps + 1) * 8, args.seqlen), generator=torch.Generator().manual_seed(0))
    per_device = args.per_device_batch or max(1, 8 // context.world_size)
    with tempfile.TemporaryDirectory() as out:
        while per_device >= 1:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            config = TrainConfig(
                max_steps=args.steps + 1, global_batch_size=8, per_device_batch_size=per_device, output_dir=out,
                save_steps=0, progress=False,
            )
            attempt: dict = {"per_device_batch": per_device}
            try:
                summary = RotationTrainer(network, blocks, config, context).train()
            except torch.cuda.OutOfMemoryError as err:
                attempt["error"] = f"out of memory: {str(err).splitlines()[0]}"
                result["attempts"].append(attempt)
                network.release_weights()
                network.zero_grad(set_to_none=True)
                gc.collect()
                per_device //= 2
                if context.distributed and 8 % (per_device * context.world_size):
                    break
                continue
            summary.pop("config", None)
            attempt["summary"] = summary
            result["attempts"].append(attempt)
            break
    done = [a for a in result["attempts"] if "summary" in a]
    if done:
        summary = done[0]["summary"]
        step = summary["step_time_s_mean"]
        result["step_time_s"] = step
        result["projected_100_steps_min"] = (summary["first_step_time_s"] + 99 * step) / 60
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory / 2**30
            result["peak_memory_allocated_gib"] = summary["peak_memory_allocated_gib"]
            result["peak_memory_reserved_gib"] = summary["peak_memory_reserved_gib"]
            result["gpu_memory_gib"] = total
            result["fits_one_gpu_memory"] = summary["peak_memory_reserved_gib"] < total
            peaks = (summary["peak_memory_reserved_gib"], summary["peak_memory_allocated_gib"])
            per_rank = _gather_peaks(context, peaks)
            result["peak_memory_reserved_gib_per_rank"] = [reserved for reserved, _ in per_rank]
            result["peak_memory_allocated_gib_per_rank"] = [allocated for _, allocated in per_rank]
    if not context.is_main:
        return 0 if done else 1
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("attempts", "config", "quant")}, indent=1, default=str))
    return 0 if done else 1


def merge(args: argparse.Namespace) -> int:
    merged = []
    for name in args.inputs:
        path = Path(name)
        if not path.is_file():
            merged.append({"file": path.name, "missing": True})
            continue
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("ppl_eval"), dict):
            data["ppl_eval"].pop("window_nll", None)
        merged.append({"file": path.name, "result": data})
    write_json(args.out, merged)
    return 0 if all("result" in m for m in merged) else 1


def main() -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("random-model", help="LLaMA-2-7B-shaped random model, a few steps")
    model.add_argument("--out", required=True)
    model.add_argument("--steps", type=int, default=3, help="measured steps (one warm-up step is added)")
    model.add_argument(
        "--per_device_batch", type=int, default=0, help="first try (default 8 / processes); halved on out-of-memory"
    )
    model.add_argument("--layers", type=int, default=32, help="decoder layers (32 for 7B; fewer for a dry run)")
    model.add_argument("--seqlen", type=int, default=2048)
    model.add_argument("--hidden", type=int, default=0, help="override hidden size (dry runs; heads = hidden / 128)")
    model.add_argument("--intermediate", type=int, default=0, help="override intermediate size (dry runs)")
    model.add_argument("--device", default=None)
    model.add_argument("--no_cache", action="store_true", help="rotate/quantize weights on every forward")
    model.add_argument("--fsdp", action="store_true", help='shard the model as --fsdp "full_shard auto_wrap"')
    joined = sub.add_parser("merge", help="merge result JSON files into one")
    joined.add_argument("--out", required=True)
    joined.add_argument("inputs", nargs="+")
    args = parser.parse_args()
    return random_model(args) if args.command == "random-model" else merge(args)


if __name__ == "__main__":
    sys.exit(main())
