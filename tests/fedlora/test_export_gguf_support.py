"""A tiny trained LLaMA that llama.cpp can K-quantize, with a byte-level BPE tokenizer.

Hidden size 256 and FFN 512 are multiples of the K-quant block (256), so
Q4_K_M really holds K-quant tensors; 2 KV heads for 4 query heads, so the q/k
permutation is exercised with grouped-query attention; an untied lm_head, so
``output.weight`` is written (the embedded default model covers the tied case).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

WORDS = [
    "the",
    "a",
    "river",
    "stone",
    "light",
    "garden",
    "morning",
    "quiet",
    "city",
    "train",
    "north",
    "window",
    "coffee",
    "market",
    "letter",
    "friend",
    "evening",
    "rain",
    "bridge",
    "sister",
    "paper",
    "old",
    "new",
]


@dataclass(frozen=True)
class TinyGguf:
    base: Path
    adapter: Path
    merged: Path
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def sentences(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(6, 14))) + "." for _ in range(count)]


def build_tiny_gguf(
    root: Path, *, hidden: int = 256, intermediate: int = 512, steps: int = 30
) -> TinyGguf:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedlora.data.tokenize import encode_texts
    from fedlora.export.merge import merge_adapter
    from fedlora.model import train_tokenizer
    from tests.fedlora.test_export_support import fit_briefly, save_adapter

    texts = sentences(0, 64)
    tokenizer = train_tokenizer(texts, 320, 64)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=intermediate,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    ids, mask = encode_texts(tokenizer, texts, 32)
    fit_briefly(model, ids, mask, steps=steps, lr=3e-3)
    base = root / "base"
    model.save_pretrained(str(base), safe_serialization=True)
    tokenizer.save_pretrained(str(base))
    adapter = save_adapter(model, root / "adapter", seed=1, scale=0.02)
    merged = merge_adapter(base, adapter, root / "merged")
    held_ids, held_mask = encode_texts(tokenizer, sentences(1, 16), 32)
    return TinyGguf(base, adapter, merged, held_ids, held_mask)


_BUILT: dict[tuple[int, int], TinyGguf] = {}


def tiny_gguf(
    factory: pytest.TempPathFactory, *, hidden: int = 256, intermediate: int = 512
) -> TinyGguf:
    """:func:`build_tiny_gguf`, once per session; tests must only read it."""
    key = (hidden, intermediate)
    if key not in _BUILT:
        root = factory.mktemp(f"tiny-gguf-{hidden}-{intermediate}")
        _BUILT[key] = build_tiny_gguf(root, hidden=hidden, intermediate=intermediate)
    return _BUILT[key]
