"""The loss-curve PNG: written atomically, a real PNG, a clear error without data."""

from __future__ import annotations

import pytest

from train_utils.plots import plot_loss_curve

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_loss_curve_is_a_png(tmp_path):
    records = [{"step": i + 1, "loss": 5.0 - 0.1 * i, "lr": 1.5 * (1 - i / 10)} for i in range(10)]
    path = plot_loss_curve(records, tmp_path / "curves" / "loss_curve.png", title="tiny")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["loss_curve.png"]  # no temporary file left behind


def test_loss_curve_without_records_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no training records"):
        plot_loss_curve([{"step": 1}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
