"""Data loading from local mirrors: field layout, joining, windows, blocks, errors."""

from __future__ import annotations

import json

import pytest
import torch

from utils.data import (
    DATA_DIR_ENV,
    get_calibration_windows,
    get_eval_windows,
    get_train_blocks,
    load_wikitext2_rows,
    read_local_split,
    resolve_data_dir,
)


class CharTokenizer:
    """One token per character (plus BOS 0), enough to check how text is joined and cut."""

    def __call__(self, text, return_tensors=None, verbose=False):
        if isinstance(text, list):
            return {"input_ids": [[0] + [ord(c) for c in row] for row in text]}
        ids = [0] + [ord(c) for c in text]
        if return_tensors == "pt":
            return type("Enc", (), {"input_ids": torch.tensor([ids])})()
        return {"input_ids": ids}


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "wikitext-2-raw-v1"
    folder.mkdir()
    for split, rows in {"test": ["ab", "", "cd"], "validation": ["xyz"] * 10, "train": ["hello"] * 4}.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return tmp_path


def test_rows_from_parent_or_subfolder(data_dir):
    assert load_wikitext2_rows("test", data_dir) == ["ab", "", "cd"]
    assert load_wikitext2_rows("test", data_dir / "wikitext-2-raw-v1") == ["ab", "", "cd"]


def test_env_variable_is_the_fallback(data_dir, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(data_dir))
    assert resolve_data_dir(None) == data_dir
    assert load_wikitext2_rows("validation", None)[0] == "xyz"


def test_eval_windows_join_rows_with_blank_lines_and_drop_the_tail(data_dir):
    windows = get_eval_windows(CharTokenizer(), seqlen=4, split="test", data_dir=data_dir)
    text = "ab\n\n\n\ncd"  # rows "ab", "", "cd" joined by "\n\n"
    expected = torch.tensor([0] + [ord(c) for c in text])
    assert windows.shape == (expected.numel() // 4, 4)
    assert torch.equal(windows.flatten(), expected[: windows.numel()])


def test_train_blocks_tokenize_rows_separately_in_order(data_dir):
    blocks = get_train_blocks(CharTokenizer(), seqlen=6, n_blocks=4, split="train", data_dir=data_dir)
    row = [0] + [ord(c) for c in "hello"]
    assert torch.equal(blocks.flatten(), torch.tensor(row * 4))
    with pytest.raises(ValueError, match="fewer than the 5"):
        get_train_blocks(CharTokenizer(), seqlen=6, n_blocks=5, split="train", data_dir=data_dir)


def test_calibration_windows_are_seeded(data_dir):
    a = get_calibration_windows(CharTokenizer(), nsamples=3, seqlen=5, seed=0, split="validation", data_dir=data_dir)
    b = get_calibration_windows(CharTokenizer(), nsamples=3, seqlen=5, seed=0, split="validation", data_dir=data_dir)
    c = get_calibration_windows(CharTokenizer(), nsamples=3, seqlen=5, seed=1, split="validation", data_dir=data_dir)
    assert a.shape == (3, 5) and torch.equal(a, b) and not torch.equal(a, c)


def test_missing_data_errors_name_the_flag_or_split(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="--data_dir"):
        resolve_data_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="'nosuch'"):
        load_wikitext2_rows("nosuch", data_dir)


def test_parquet_mirror(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "wikitext-2-raw-v1"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["a", "b"]}), folder / "test-00000-of-00001.parquet")
    assert load_wikitext2_rows("test", tmp_path) == ["a", "b"]
    assert read_local_split(folder, "test") == [{"text": "a"}, {"text": "b"}]


def test_real_wikitext_mirror_has_the_expected_rows(shared_data_dir):
    assert len(load_wikitext2_rows("test", shared_data_dir)) == 4358
    assert len(load_wikitext2_rows("validation", shared_data_dir)) == 3760
