"""Outputs are written atomically, readable like ordinary files, and JSON-serialisable."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from utils.io import PhaseTimer, atomic_write, torch_save_atomic, write_json


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})

    def crash(tmp):
        with open(tmp, "w") as handle:
            handle.write("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_files_get_the_umask_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        path = torch_save_atomic({"x": torch.ones(2)}, tmp_path / "sub" / "R.bin")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert torch.equal(torch.load(path)["x"], torch.ones(2))


def test_json_handles_tensors_dtypes_dataclasses_and_paths(tmp_path):
    from spinquant.config import QuantConfig

    write_json(tmp_path / "r.json", {"t": torch.tensor([1.5]), "d": torch.bfloat16, "q": QuantConfig(w_bits=4),
                                     "p": tmp_path})
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["t"] == [1.5] and data["d"] == "bfloat16" and data["q"]["w_bits"] == 4 and data["p"] == str(tmp_path)


def test_phase_timer_accumulates_phases():
    timer = PhaseTimer()
    with timer.phase("a"):
        pass
    with timer.phase("a"):
        pass
    out = timer.as_dict()
    assert set(out) == {"a", "total"} and out["a"] >= 0 and out["total"] >= out["a"]
