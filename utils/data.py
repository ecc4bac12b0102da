"""Data loading: WikiText-2 from the hub or from local mirrors, cut the ways the paper's code cuts it.

Three views of the same corpus, one per consumer:

* :func:`get_eval_windows` -- perplexity: rows joined with ``"\\n\\n"``, tokenized once, non-overlapping windows;
* :func:`get_train_blocks` -- rotation learning: each row tokenized on its own, concatenated, cut in order;
* :func:`get_calibration_windows` -- GPTQ: rows joined with ``"\\n\\n"``, random windows (Python ``random``).

Local mirrors (``--data_dir`` or ``$SPINQUANT_DATA_DIR``) hold the hub dataset's field layout as JSON Lines or
parquet, e.g. ``data/wikitext-2-raw-v1/test.jsonl`` with a ``text`` field. Without one, data comes from the hub.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "SPINQUANT_DATA_DIR"
WIKITEXT2_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1")
WIKITEXT2_SUBDIR = "wikitext-2-raw-v1"

__all__ = [
    "DATA_DIR_ENV",
    "resolve_data_dir",
    "load_wikitext2_rows",
    "read_local_split",
    "get_eval_windows",
    "get_train_blocks",
    "get_calibration_windows",
]


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The local data folder: the flag if given, else ``$SPINQUANT_DATA_DIR``, else None (use the hub)."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        source = "--data_dir" if data_dir not in (None, "") else f"${DATA_DIR_ENV}"
        raise FileNotFoundError(f"{source} points to {str(path)!r}, which is not a directory")
    return path


def _split_files(folder: Path, split: str) -> list[Path]:
    jsonl = folder / f"{split}.jsonl"
    if jsonl.is_file():
        return [jsonl]
    for pattern in (f"{split}.parquet", f"{split}-*.parquet", f"{split}/*.parquet"):
        found = sorted(Path(p) for p in glob.glob(str(folder / pattern)))
        if found:
            return found
    return []


def read_local_split(folder: Path, split: str, field: str | None = None) -> list:
    """Rows of ``split`` from a JSONL or parquet mirror in ``folder`` (records, or one field of each)."""
    files = _split_files(folder, split)
    if not files:
        raise FileNotFoundError(
            f"no {split!r} split in {str(folder)!r}: expected {split}.jsonl, {split}.parquet or {split}-*.parquet"
        )
    records: list = []
    for path in files:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                records.extend(json.loads(line) for line in handle if line.strip())
        else:
            import pyarrow.parquet as pq  # optional: only parquet mirrors need it

            records.extend(pq.read_table(path).to_pylist())
    if field is None:
        return records
    if records and field not in records[0]:
        raise KeyError(f"{files[0]} has no field {field!r} (fields: {sorted(records[0])})")
    return [record[field] for record in records]


def load_wikitext2_rows(split: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The ``text`` rows of a WikiText-2 (raw) split, from a local mirror or the hub."""
    folder = resolve_data_dir(data_dir)
    if folder is not None:
        for candidate in (folder / WIKITEXT2_SUBDIR, folder):
            if _split_files(candidate, split):
                rows = read_local_split(candidate, split, field="text")
                logger.info("WikiText-2 %s: %d rows from %s", split, len(rows), candidate)
                return rows
        hint = " (the train split is not shipped in ../shared/data: use a validation split)" if split == "train" else ""
        raise FileNotFoundError(
            f"WikiText-2 split {split!r} not found under data dir {str(folder)!r} or its {WIKITEXT2_SUBDIR}/ "
            f"subfolder{hint}"
        )
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "loading WikiText-2 from the hub needs the `datasets` package; install it or pass --data_dir "
            f"(or set ${DATA_DIR_ENV}) to a local mirror"
        ) from err
    rows = datasets.load_dataset(*WIKITEXT2_HUB, split=split)["text"]
    logger.info("WikiText-2 %s: %d rows from the hub", split, len(rows))
    return list(rows)


def _tokenize_joined(tokenizer, rows: list[str]) -> torch.Tensor:
    text = "\n\n".join(rows)
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    return ids


def get_eval_windows(
    tokenizer, seqlen: int, split: str = "test", data_dir: str | os.PathLike | None = None
) -> torch.Tensor:
    """Perplexity windows ``[n, seqlen]``: rows joined by blank lines, tokenized once, tail dropped."""
    ids = _tokenize_joined(tokenizer, load_wikitext2_rows(split, data_dir))
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"WikiText-2 {split} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n_windows * seqlen].view(n_windows, seqlen)


def get_train_blocks(
    tokenizer,
    seqlen: int,
    n_blocks: int,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    repeat: bool = False,
) -> torch.Tensor:
    """Rotation-learning blocks ``[n_blocks, seqlen]``: rows tokenized one by one, concatenated, taken in order.

    ``repeat``: when the split holds fewer blocks, start again from the first one (in order), as the Hugging Face
    Trainer does over epochs; e.g. 800 blocks from the 129 of the validation split.
    """
    rows = load_wikitext2_rows(split, data_dir)
    encoded = tokenizer(rows, verbose=False)["input_ids"]
    flat = [token for row in encoded for token in row]
    available = len(flat) // seqlen
    if repeat and 0 < available < n_blocks:
        blocks = torch.tensor(flat[: available * seqlen], dtype=torch.long).view(available, seqlen)
        logger.info("WikiText-2 %s: %d blocks of %d tokens, repeated in order to %d", split, available, seqlen, n_blocks)
        return blocks[torch.arange(n_blocks) % available]
    if available < n_blocks:
        raise ValueError(
            f"WikiText-2 {split} gives {available} blocks of {seqlen} tokens, fewer than the {n_blocks} asked for"
        )
    return torch.tensor(flat[: n_blocks * seqlen], dtype=torch.long).view(n_blocks, seqlen)


def get_calibration_windows(
    tokenizer,
    nsamples: int,
    seqlen: int,
    seed: int,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """GPTQ calibration ``[nsamples, seqlen]``: random windows of the joined split, Python ``random`` seeded."""
    ids = _tokenize_joined(tokenizer, load_wikitext2_rows(split, data_dir))
    if ids.numel() <= seqlen + 1:
        raise ValueError(f"WikiText-2 {split} has {ids.numel()} tokens, too few for windows of {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])
