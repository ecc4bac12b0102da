"""The training loop: schedule, batch layout, accumulation, checkpoints and resume, non-finite losses, logs.

Tolerance: runs that split the same global batch differently (micro-batches) sum the same float32 gradients in a
different order (~1e-7 relative); after a few Cayley steps the rotations agree to ~1e-6, we allow 1e-5.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from spinquant.config import QuantConfig
from spinquant.rotation import R1_KEY, load_rotations, make_random_rotations
from tests.helpers import make_tiny_model
from train_utils.rotation_model import build_rotation_network
from train_utils.trainer import (
    CHECKPOINT_FILE,
    LAST_GOOD_FILE,
    LOG_FILE,
    NonFiniteLossError,
    RotationTrainer,
    TrainConfig,
    learning_rate_at,
    parse_fsdp_options,
)
from utils.data import get_train_blocks, load_wikitext2_rows

QUANT = QuantConfig(
    w_bits=4, a_bits=4, k_bits=4, v_bits=4, w_clip=True, a_asym=True, k_asym=True, v_asym=True,
    k_groupsize=16, v_groupsize=16,
)


def _network(seed: int = 0):
    model = make_tiny_model("llama")
    return build_rotation_network(model, QUANT, make_random_rotations(model, "hadamard", seed))


def _blocks(n: int = 16, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(0, 300, (n, seqlen), generator=torch.Generator().manual_seed(1))


def _config(tmp_path, **overrides) -> TrainConfig:
    values = dict(max_steps=4, global_batch_size=4, per_device_batch_size=2, output_dir=str(tmp_path), progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def test_cosine_schedule_matches_transformers():
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.5)
    for kind, warmup in (("cosine", 0), ("cosine", 3), ("linear", 2), ("constant", 0), ("constant_with_warmup", 2)):
        scheduler = get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=10)
        for step in range(10):
            expected = 1.5 * scheduler.lr_lambdas[0](step)
            assert learning_rate_at(step, 1.5, kind, 10, warmup) == pytest.approx(expected, rel=1e-12), (kind, step)


def test_fsdp_options():
    assert parse_fsdp_options("full_shard auto_wrap") == {"full_shard", "auto_wrap"}
    assert parse_fsdp_options(["auto_wrap"]) == {"full_shard", "auto_wrap"}
    assert parse_fsdp_options("") == set()
    with pytest.raises(ValueError, match="offload"):
        parse_fsdp_options("full_shard offload")
    with pytest.raises(ValueError, match="exclusive"):
        parse_fsdp_options("full_shard shard_grad_op")


def test_each_step_takes_the_next_global_batch_in_order_whatever_the_split(tmp_path):
    network = _network()
    for per_device, world in ((1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (1, 4)):
        trainer = RotationTrainer(network, _blocks(), _config(tmp_path, per_device_batch_size=per_device))
        trainer.context.world_size = world
        trainer.accumulation = 4 // (per_device * world)
        for step in range(3):
            taken = sorted(
                i
                for rank in range(world)
                for micro in range(trainer.accumulation)
                for i in trainer.batch_indices(step, micro, rank)
            )
            assert taken == list(range(4 * step, 4 * step + 4))
    assert trainer.batch_indices(5, 0, 0) == [20 % 16]  # past the end: wraps around, in order


def test_batch_split_must_match_the_global_batch(tmp_path):
    with pytest.raises(ValueError, match="--global_batch_size"):
        RotationTrainer(_network(), _blocks(), _config(tmp_path, per_device_batch_size=3))
    with pytest.raises(ValueError, match="--gradient_accumulation_steps"):
        RotationTrainer(_network(), _blocks(), _config(tmp_path, gradient_accumulation_steps=3))


def test_accumulation_gives_the_same_rotations_as_one_big_batch(tmp_path):
    results = []
    for per_device in (4, 1):
        network = _network()
        RotationTrainer(network, _blocks(), _config(tmp_path / str(per_device), per_device_batch_size=per_device)).train()
        results.append(network.rotations.state_as_rotations())
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=0, atol=1e-5)


def test_training_logs_checkpoints_and_resumes_to_the_same_rotations(tmp_path):
    straight = _network()
    trainer = RotationTrainer(straight, _blocks(), _config(tmp_path / "straight", save_steps=2))
    summary = trainer.train()
    records = [json.loads(line) for line in (tmp_path / "straight" / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "rotation_s", "forward_backward_s"):
        assert all(math.isfinite(r[key]) for r in records), key
    assert records[0]["lr"] == 1.5 and records[-1]["lr"] < records[0]["lr"]
    assert summary["steps_run"] == 4 and summary["tokens_per_step"] == 4 * 16
    assert summary["rotation_s_per_step"] > 0 and 0 < summary["rotation_fraction_of_step"] < 1

    # A run that crashes in step 3, after the checkpoint of step 2, is resumed by a new trainer.
    crashing = RotationTrainer(_network(), _blocks(), _config(tmp_path / "resumed", save_steps=2))
    real_step = crashing.train_step

    def train_step(step):
        if step == 2:
            raise RuntimeError("simulated crash")
        return real_step(step)

    crashing.train_step = train_step
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.train()
    checkpoint = torch.load(tmp_path / "resumed" / CHECKPOINT_FILE, weights_only=True)
    assert checkpoint["step"] == 2 and checkpoint["data_position"] == 8
    # a stale later line in the log (say the crash came after logging step 3) must be dropped on resume
    with open(tmp_path / "resumed" / LOG_FILE, "a") as handle:
        handle.write(json.dumps({"step": 3, "loss": 0.0}) + "\n")
    resumed = _network()
    config = _config(tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "resumed"))
    trainer = RotationTrainer(resumed, _blocks(), config)
    summary = trainer.train()
    assert summary["start_step"] == 2 and summary["steps_run"] == 2
    lines = [json.loads(line) for line in (tmp_path / "resumed" / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert [r["loss"] for r in lines] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    a, b = straight.rotations.state_as_rotations(), resumed.rotations.state_as_rotations()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    network = _network()
    RotationTrainer(network, _blocks(), _config(tmp_path, max_steps=1, fingerprint={"w_bits": 4})).train()
    config = _config(tmp_path, resume_from_checkpoint=str(tmp_path / CHECKPOINT_FILE), fingerprint={"w_bits": 16})
    with pytest.raises(ValueError, match="w_bits=4"):
        RotationTrainer(_network(), _blocks(), config).train()
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint"):
        RotationTrainer(_network(), _blocks(), _config(tmp_path, resume_from_checkpoint=str(tmp_path / "nope"))).train()


def test_a_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_good_rotations(tmp_path, monkeypatch):
    network = _network()
    trainer = RotationTrainer(network, _blocks(), _config(tmp_path))
    real_forward = type(network).forward
    calls = {"n": 0}

    def forward(self, input_ids):
        calls["n"] += 1
        loss, count = real_forward(self, input_ids)
        return (loss * float("nan") if calls["n"] > 2 else loss), count  # step 1: 2 micro-batches, then NaN

    monkeypatch.setattr(type(network), "forward", forward)
    with pytest.raises(NonFiniteLossError, match=r"step 2: the loss is nan.*R_last_good\.bin"):
        trainer.train()
    kept = load_rotations(tmp_path / LAST_GOOD_FILE, network.model)
    current = network.rotations.state_as_rotations()
    assert torch.equal(kept[R1_KEY].float(), current[R1_KEY])  # the bad step was not taken
    assert torch.isfinite(current[R1_KEY]).all()
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["step"] == 1


def test_the_quantized_loss_goes_down_on_a_tiny_model(tmp_path):
    """Learning the rotations lowers the W4A4KV4 loss on the blocks it trains on (a fixed set, 15 steps)."""
    network = _network(seed=5)
    blocks = _blocks(n=4, seqlen=32)

    def loss() -> float:
        network.eval()
        with torch.no_grad():
            total, count = network(blocks)
        network.train()
        return total.item() / count

    before = loss()
    RotationTrainer(network, blocks, _config(tmp_path, max_steps=15, per_device_batch_size=4)).train()
    after = loss()
    assert after < before - 0.02, (before, after)


def test_train_blocks_repeat_in_order_when_the_split_is_short(tiny_data_dir, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    available = get_train_blocks(tokenizer, 32, 1, split="validation", data_dir=tiny_data_dir)
    rows = tokenizer(load_wikitext2_rows("validation", tiny_data_dir), verbose=False)["input_ids"]
    total = sum(len(row) for row in rows) // 32
    repeated = get_train_blocks(tokenizer, 32, total * 2 + 3, split="validation", data_dir=tiny_data_dir, repeat=True)
    assert repeated.shape == (total * 2 + 3, 32)
    assert torch.equal(repeated[0], available[0])
    assert torch.equal(repeated[total : 2 * total], repeated[:total])
    with pytest.raises(ValueError, match="fewer than"):
        get_train_blocks(tokenizer, 32, total + 1, split="validation", data_dir=tiny_data_dir)


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "on-the-fly"])
def test_weights_are_quantized_once_per_step_with_the_cache(tmp_path, monkeypatch, cache):
    """The structure that makes a step cheap: with the cache, one clip search per bucket of weights per step, however
    many micro-batches and recomputations; on the fly (the paper's way), one per weight per forward and again per
    checkpoint recomputation."""
    import train_utils.rotation_model as rotation_model

    calls = {"n": 0}
    real = rotation_model.fake_quantize_weight

    def counting(weight, spec, clip_search=False):
        calls["n"] += 1
        return real(weight, spec, clip_search=clip_search)

    monkeypatch.setattr(rotation_model, "fake_quantize_weight", counting)
    model = make_tiny_model("llama")
    network = build_rotation_network(model, QUANT, make_random_rotations(model, "hadamard", 0), cache_weights=cache)
    trainer = RotationTrainer(network, _blocks(), _config(tmp_path, max_steps=2, per_device_batch_size=1))
    assert trainer.accumulation == 4
    trainer.train()
    linears = 2 * 7
    if cache:
        # input width 64 (q/k/v/gate/up), 64 (o_proj: 4 heads x 16) and 96 (down_proj): two buckets per step
        assert calls["n"] == 2 * 2
    else:
        assert calls["n"] == 2 * trainer.accumulation * linears * 2  # steps x micro-batches x weights x (fwd + recompute)
