"""Shared fixtures: a tiny LLaMA with a LoRA adapter, built locally (no hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session", autouse=True)
def _fedlora_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the embedded default model's cache inside the test session unless one is given."""
    if "FEDLORA_CACHE" not in os.environ:
        os.environ["FEDLORA_CACHE"] = str(tmp_path_factory.mktemp("fedlora-cache"))


def tiny_lora_model(seed: int = 0, vocab: int = 97):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(model, lora)
