"""Helpers importable by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import torch


def make_tiny_model(
    arch: str = "llama",
    *,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 96,
    layers: int = 2,
    vocab: int = 300,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    attn: str = "sdpa",
):
    """A random model with random (non-unit) norm scales, so norm fusion is really exercised.

    intermediate=96 = 12 * 8 makes R4 use a non-power-of-two Hadamard (the factor 12).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    common = dict(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        vocab_size=vocab,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        use_cache=False,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
        config.architectures = ["LlamaForCausalLM"]
        model = LlamaForCausalLM(config)
    elif arch == "mistral":
        config = MistralConfig(**common, sliding_window=None)
        config.architectures = ["MistralForCausalLM"]
        model = MistralForCausalLM(config)
    else:
        raise ValueError(arch)
    model.set_attn_implementation(attn)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand_like(param) + 0.5)
            elif param.dim() == 2:
                param.normal_(0, 0.2)
    return model.to(dtype).eval()
