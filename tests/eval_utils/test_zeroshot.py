"""Zero-shot evaluation through lm-eval on local data: lm-eval's own tasks, real model scores, the paper's average."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from eval_utils.zeroshot import PAPER_TASKS, evaluate_zeroshot, local_task_overrides, parse_tasks  # noqa: E402
from tests.helpers import make_tiny_model  # noqa: E402

# What ../shared/data/zeroshot ships: lm-eval's evaluation split of each task (arc_challenge is not shipped).
SHIPPED = {
    "piqa": "validation",
    "arc_easy": "test",
    "hellaswag": "validation",
    "winogrande": "validation",
    "boolq": "validation",
    "social_iqa": "validation",
    "openbookqa": "test",
}
HAS_ACC_NORM = {"piqa", "arc_easy", "arc_challenge", "hellaswag", "openbookqa"}
ROWS = 6


@pytest.fixture(scope="module")
def small_zeroshot_dir(tmp_path_factory):
    """The first rows of every shipped task file (same layout), plus arc_challenge laid out as arc_easy."""
    shared = Path(__file__).resolve().parents[3] / "shared" / "data" / "zeroshot"
    if not (shared / "piqa" / "validation.jsonl").is_file():
        pytest.skip(f"zero-shot data not found at {shared}")
    root = tmp_path_factory.mktemp("zeroshot")
    for task, split in SHIPPED.items():
        with open(shared / task / f"{split}.jsonl", encoding="utf-8") as handle:
            head = [next(handle) for _ in range(ROWS)]
        (root / task).mkdir()
        (root / task / f"{split}.jsonl").write_text("".join(head), encoding="utf-8")
    # ARC-Challenge rows have exactly ARC-Easy's fields; rows from the end of ARC-Easy's file stand in for them.
    with open(shared / "arc_easy" / "test.jsonl", encoding="utf-8") as handle:
        tail = handle.readlines()[-ROWS:]
    (root / "arc_challenge").mkdir()
    (root / "arc_challenge" / "test.jsonl").write_text("".join(tail), encoding="utf-8")
    return root, shared


@pytest.fixture(scope="module")
def tiny_lm(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    return make_tiny_model("llama", tie=True, seed=0), tokenizer


def test_parse_tasks_defaults_to_the_papers_eight():
    assert parse_tasks(None) == list(PAPER_TASKS) == parse_tasks("")
    assert len(PAPER_TASKS) == 8
    assert parse_tasks("piqa, boolq,piqa") == ["piqa", "boolq"]


def test_local_overrides_point_at_the_shipped_files(small_zeroshot_dir):
    _, shared = small_zeroshot_dir
    for task, split in SHIPPED.items():
        overrides, where = local_task_overrides(task, shared)
        assert where == str(shared / task / f"{split}.jsonl")
        assert overrides["dataset_path"] == "json" and overrides["dataset_name"] is None
        local = str((shared / task / f"{split}.jsonl").resolve())
        assert overrides["dataset_kwargs"] == {"data_files": {split: local}}
        assert overrides["training_split"] is None and overrides["fewshot_split"] is None
        kept = {k: overrides[k] for k in ("validation_split", "test_split") if overrides[k]}
        assert list(kept.values()) == [split]
    overrides, reason = local_task_overrides("arc_challenge", shared)
    assert overrides is None and "arc_challenge" in reason and "test.jsonl" in reason
    with pytest.raises(ValueError, match="--tasks"):
        local_task_overrides("no_such_task", shared)


def test_all_paper_tasks_end_to_end_on_local_data(small_zeroshot_dir, tiny_lm):
    root, _ = small_zeroshot_dir
    model, tokenizer = tiny_lm
    result = evaluate_zeroshot(model, tokenizer, None, limit=3, batch_size=4, data_dir=root)
    assert set(result["tasks"]) == set(PAPER_TASKS) and result["skipped"] == {}
    for name, task in result["tasks"].items():
        assert task["examples"] == 3
        assert 0 <= task["acc"] <= 1
        split = "test" if name in ("arc_easy", "arc_challenge", "openbookqa") else "validation"
        assert task["data"] == str(root / name / f"{split}.jsonl")
        if name in HAS_ACC_NORM:
            assert 0 <= task["acc_norm"] <= 1 and task["metric"] == "acc_norm" and task["score"] == task["acc_norm"]
        else:
            assert task["acc_norm"] is None and task["metric"] == "acc" and task["score"] == task["acc"]
    assert result["avg"] == pytest.approx(sum(t["score"] for t in result["tasks"].values()) / 8)
    json.dumps(result)  # JSON-ready


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context) computed directly, tokenized the way lm-eval's HFLM does."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    prefix = tokenizer(context, add_special_tokens=False).input_ids
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(prefix), len(whole)))


def test_scores_are_the_models_own_loglikelihoods(small_zeroshot_dir, tiny_lm, tiny_tokenizer_dir):
    root, _ = small_zeroshot_dir
    model, tokenizer = tiny_lm
    result = evaluate_zeroshot(model, tokenizer, "piqa", limit=2, batch_size=2, data_dir=root, return_samples=True)
    sample = result["samples"]["piqa"][0]
    lm_eval_scores = [resp[0][0] for resp in sample["resps"]]
    direct = [_loglikelihood(model, tokenizer, ctx, cont) for ctx, cont in sample["arguments"]]
    # float32, same tokens; lm-eval pads and batches differently: round-off only.
    assert lm_eval_scores == pytest.approx(direct, abs=1e-3)
    assert result["tasks"]["piqa"]["acc"] == pytest.approx(
        sum(float(s["acc"]) for s in result["samples"]["piqa"]) / 2
    )
    other = make_tiny_model("llama", tie=True, seed=1)
    again = evaluate_zeroshot(other, tokenizer, "piqa", limit=2, batch_size=2, data_dir=root, return_samples=True)
    other_scores = [resp[0][0] for resp in again["samples"]["piqa"][0]["resps"]]
    assert all(not math.isclose(a, b, abs_tol=1e-3) for a, b in zip(lm_eval_scores, other_scores))


def test_hellaswag_and_social_iqa_prompts_from_local_layout(small_zeroshot_dir, tiny_lm):
    """HellaSwag's ctx_a holds the whole context and ctx_b is empty; SocialIQA labels are "1".."3"."""
    root, _ = small_zeroshot_dir
    model, tokenizer = tiny_lm
    result = evaluate_zeroshot(
        model, tokenizer, "hellaswag,social_iqa", limit=1, batch_size=4, data_dir=root, return_samples=True
    )
    first = json.loads((root / "hellaswag" / "validation.jsonl").read_text().splitlines()[0])
    hs = result["samples"]["hellaswag"][0]
    assert hs["arguments"][0][0] == f"{first['activity_label']}: {first['ctx_a']}"
    assert hs["target"] == int(first["label"]) and len(hs["arguments"]) == 4
    siqa_first = json.loads((root / "social_iqa" / "validation.jsonl").read_text().splitlines()[0])
    assert result["samples"]["social_iqa"][0]["target"] == int(siqa_first["label"]) - 1


def test_missing_local_task_is_skipped_and_reported(small_zeroshot_dir, tiny_lm, tmp_path):
    root, _ = small_zeroshot_dir
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "validation.jsonl").write_text((root / "boolq" / "validation.jsonl").read_text())
    model, tokenizer = tiny_lm
    result = evaluate_zeroshot(model, tokenizer, "boolq,arc_challenge", limit=2, batch_size=2, data_dir=tmp_path)
    assert list(result["tasks"]) == ["boolq"]
    assert "arc_challenge" in result["skipped"] and "test.jsonl" in result["skipped"]["arc_challenge"]
    assert result["avg"] == result["tasks"]["boolq"]["acc"]
    with pytest.raises(FileNotFoundError, match="--tasks_data_dir"):
        evaluate_zeroshot(model, tokenizer, "boolq", data_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="--tasks"):
        evaluate_zeroshot(model, tokenizer, "no_such_task", data_dir=tmp_path)


def test_cli_zero_shot_after_perplexity(tiny_model_dir, tiny_data_dir, small_zeroshot_dir, tmp_path, capsys):
    from spinquant.ptq import main

    root, _ = small_zeroshot_dir
    out = tmp_path / "result.json"
    code = main([
        "--input_model", str(tiny_model_dir), "--data_dir", str(tiny_data_dir), "--model_max_length", "32",
        "--eval_windows", "2", "--result_json", str(out), "--no_progress", "--w_bits", "4", "--a_bits", "8",
        "--nsamples", "2", "--calib_split", "validation", "--rotate",
        "--tasks", "piqa,winogrande,lambada_openai",
        "--limit", "2", "--tasks_data_dir", str(root), "--lm_eval_batch_size", "4",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert "0-shot avg is: " in printed
    assert set(result["zeroshot"]["tasks"]) == {"piqa", "winogrande"}
    assert list(result["zeroshot"]["skipped"]) == ["lambada_openai"]  # a real lm-eval task with no local file
    assert result["zeroshot_avg"] == pytest.approx(
        (result["zeroshot"]["tasks"]["piqa"]["acc_norm"] + result["zeroshot"]["tasks"]["winogrande"]["acc"]) / 2
    )
    assert result["zeroshot"]["limit"] == 2 and "eval_zeroshot" in result["timings"]
    assert result["weight_method"] == "gptq"


def test_cli_tasks_flag_alone_means_the_papers_eight():
    from utils.args import parse_ptq_args

    assert parse_ptq_args(["--tasks"]).tasks == ""
    assert parse_ptq_args([]).tasks is None
    assert parse_ptq_args(["--lm_eval_batch_size", "auto"]).lm_eval_batch_size == "auto"
    assert parse_ptq_args(["--lm_eval_batch_size", "8"]).lm_eval_batch_size == 8
    with pytest.raises(SystemExit):
        parse_ptq_args(["--limit", "0"])
