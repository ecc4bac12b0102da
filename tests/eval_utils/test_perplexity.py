"""Perplexity equals the textbook computation from full logits."""

from __future__ import annotations

import math

import pytest
import torch

from eval_utils import perplexity
from eval_utils.perplexity import evaluate_perplexity, window_nlls
from tests.helpers import make_tiny_model


def test_matches_cross_entropy_of_full_logits(monkeypatch):
    model = make_tiny_model("llama", tie=True)
    windows = torch.randint(0, 300, (5, 32), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(perplexity, "LOGIT_CHUNK_TOKENS", 7)  # exercise the chunking
    result = evaluate_perplexity(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 300), windows[:, 1:].reshape(-1), reduction="none"
    ).view(5, 31).mean(1)
    # float32 everywhere: identical math, differences only from summation order (~1e-6)
    assert result["ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    torch.testing.assert_close(torch.tensor(result["window_nll"]), nll, rtol=0, atol=1e-5)
    assert result["windows"] == 5 and result["tokens"] == 160


def test_window_nll_is_per_row():
    model = make_tiny_model("llama")
    windows = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(1))
    together = window_nlls(model, windows)
    alone = window_nlls(model, windows[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=1e-5)


def test_rejects_empty_input():
    with pytest.raises(ValueError):
        evaluate_perplexity(make_tiny_model("llama"), torch.zeros(0, 8, dtype=torch.long))
