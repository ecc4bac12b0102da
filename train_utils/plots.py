"""The training-loss curve as a PNG (matplotlib, headless Agg backend), written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from utils.io import atomic_write

__all__ = ["plot_loss_curve"]


def plot_loss_curve(records: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Loss (and learning rate, on a second axis) against the step, from the per-step log records."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    rows = [r for r in records if "step" in r and "loss" in r]
    if not rows:
        raise ValueError("no training records with a step and a loss to plot")
    steps = [r["step"] for r in rows]
    figure = Figure(figsize=(7, 4), dpi=120)
    axis = figure.add_subplot(1, 1, 1)
    axis.plot(steps, [r["loss"] for r in rows], color="tab:blue", marker="." if len(rows) < 50 else None)
    axis.set_xlabel("step")
    axis.set_ylabel("quantized-network loss (cross-entropy)", color="tab:blue")
    axis.grid(alpha=0.3)
    if all("lr" in r for r in rows):
        lr_axis = axis.twinx()
        lr_axis.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.6, linewidth=1)
        lr_axis.set_ylabel("learning rate", color="tab:orange")
    axis.set_title(title or "SpinQuant rotation learning")
    figure.tight_layout()
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
