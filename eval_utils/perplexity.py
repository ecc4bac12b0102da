"""WikiText-2 perplexity as the paper's code computes it.

Each window of ``seqlen`` tokens is scored on its own (no overlap, no carried context); a window's loss is its
mean next-token NLL over ``seqlen - 1`` predictions; ``ppl = exp(mean over windows)``.

The lm_head runs in the model's dtype (as in the paper) but in chunks of positions, and the log-softmax in
float32, so full ``[batch, seqlen, vocab]`` logits are never materialised.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["evaluate_perplexity", "window_nlls"]

LOGIT_CHUNK_TOKENS = 8192


def _output_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head) to score tokens with")
    return head


@torch.no_grad()
def window_nlls(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each row of ``input_ids`` ``[batch, seqlen]`` (float32, shape ``[batch]``)."""
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    head = _output_head(model)
    hidden = hidden[:, :-1, :]
    targets = input_ids[:, 1:]
    batch, positions, _ = hidden.shape
    flat_hidden = hidden.reshape(batch * positions, -1)
    flat_targets = targets.reshape(-1)
    losses = torch.empty(batch * positions, dtype=torch.float32, device=hidden.device)
    for start in range(0, flat_hidden.shape[0], LOGIT_CHUNK_TOKENS):
        stop = start + LOGIT_CHUNK_TOKENS
        logits = head(flat_hidden[start:stop]).float()
        losses[start:stop] = nn.functional.cross_entropy(logits, flat_targets[start:stop], reduction="none")
    return losses.view(batch, positions).mean(dim=1)


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True, desc: str = "wiki2 ppl"
) -> dict:
    """Perplexity over ``windows`` ``[n, seqlen]``; returns ppl plus the per-window NLLs for analysis."""
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError(f"expected windows of shape [n, seqlen] with n > 0, got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    nlls = []
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        nlls.append(window_nlls(model, batch).cpu())
    per_window = torch.cat(nlls)
    if not torch.isfinite(per_window).all():
        bad = int((~torch.isfinite(per_window)).sum())
        logger.warning("%d of %d windows have a non-finite loss", bad, per_window.numel())
    mean_nll = per_window.mean().item()
    return {
        "ppl": math.exp(mean_nll) if math.isfinite(mean_nll) else float("inf"),
        "mean_nll": mean_nll,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "tokens": int(windows.numel()),
        "window_nll": [round(v, 6) for v in per_window.tolist()],
    }
