"""Tiny checkpoints of every model family fedlora exports to GGUF, built locally from config.

:func:`tiny_checkpoint` writes a ``save_pretrained`` directory of one family — a
transformers config shaped like the family's real models (grouped-query
attention, tied or untied embeddings, the family's RoPE, norms, sliding windows
and soft-capping), small enough to convert and run in seconds — and a tokenizer
copied from ``tokenizer_dir`` (default: a byte-level BPE made the way the
embedded default model's is). Nothing reaches a model hub.

A randomly initialised model's logits are all close to zero: which token is
"top-1" is decided by noise and KL is tiny whatever the conversion does, so the
export gates would measure nothing. The model is therefore trained for a few
dozen full-batch AdamW steps on seeded synthetic sentences, until its next-token
distributions are peaked like a real model's (:func:`heldout` gives held-out
sentences of the same kind). Everything is seeded: the same call writes the same
weights.
"""

from __future__ import annotations

import functools
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GRAMMAR = (
    ("the", "a", "one old", "every new"),
    ("river", "stone", "garden", "city", "train", "window", "market", "bridge", "café", "日本"),
    ("walks", "waits", "sleeps", "shines", "turns", "rests"),
    ("under", "over", "near", "behind"),
    ("letter", "friend", "evening", "paper", "coffee", "sister", "naïve crowd"),
)
"""Sentences are ``<det> <noun> <verb> <prep> the <noun>.``: some tokens follow from the
ones before (``the``, the full stop, a word's later pieces), so a trained model is confident
about them, as a real model is about most of a text."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)
SLIDING_WINDOW = 8
"""Shorter than the held-out sequences, so a sliding window changes the logits."""


def _llama(base: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**base, tie_word_embeddings=True)  # SmolLM2, Llama-3.2: tied


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
"""Llama-3.x RoPE, scaled down: with head_dim 16 and an original context of 64, the
frequencies fall into all three of llama3's bands (kept, smoothed, divided by factor)."""


def _llama3(base: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    rope = dict(LLAMA3_ROPE)
    return LlamaConfig(**base, tie_word_embeddings=False, rope_parameters=rope)  # 8B: untied


def _mistral(base: dict[str, Any]) -> Any:
    from transformers import MistralConfig

    return MistralConfig(**base, tie_word_embeddings=False, sliding_window=None)


def _qwen2(base: dict[str, Any]) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**base, tie_word_embeddings=True)  # q/k/v biases: always on


def _gemma_heads(base: dict[str, Any]) -> dict[str, Any]:
    """Heads twice as wide as ``hidden / heads``: like Gemma's (2B: 8 x 256 on 2304)."""
    return {**base, "head_dim": 2 * base["head_dim"]}


def _gemma2(base: dict[str, Any]) -> Any:
    from transformers import Gemma2Config

    # Soft-caps low enough to bite on a tiny model, and unlike llama.cpp's defaults (50, 30),
    # so a file that lost them is wrong.
    return Gemma2Config(
        **_gemma_heads(base),
        query_pre_attn_scalar=2 * base["head_dim"],
        sliding_window=SLIDING_WINDOW,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=10.0,
    )


def _gemma3(base: dict[str, Any]) -> Any:
    from transformers import Gemma3TextConfig

    # A sliding and a global layer (Gemma 3 alternates five and one), so both RoPE bases and
    # both attention kinds are used.
    return Gemma3TextConfig(
        **_gemma_heads(base),
        query_pre_attn_scalar=2 * base["head_dim"],
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    )


def _phi3(base: dict[str, Any]) -> Any:
    from transformers import Phi3Config

    return Phi3Config(**base, tie_word_embeddings=False, sliding_window=None)


FAMILIES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "llama": _llama,
    "llama3": _llama3,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": _phi3,
}
"""Family name → transformers config of that family, from the shared tiny shape."""


def sentences(seed: int, count: int, *, per_row: int = 2) -> list[str]:
    """``count`` texts of ``per_row`` sentences each, from ``seed``."""
    rng = random.Random(seed)
    det, noun, verb, prep, obj = GRAMMAR

    def sentence() -> str:
        return (
            f"{rng.choice(det)} {rng.choice(noun)} {rng.choice(verb)} {rng.choice(prep)} "
            f"the {rng.choice(obj)}."
        )

    return [" ".join(sentence() for _ in range(per_row)) for _ in range(count)]


@functools.lru_cache(maxsize=1)
def _byte_level_bpe() -> Any:
    from fedlora.model import train_tokenizer

    return train_tokenizer(sentences(0, 1000), 320, 128)  # words of a few tokens each


def load_tokenizer(tokenizer_dir: Path | None) -> Any:
    """The tokenizer in ``tokenizer_dir``; by default a byte-level BPE (GPT-2 pre-tokenizer,
    ``<s>`` prepended) made by the embedded default model's recipe
    (:func:`fedlora.model.train_tokenizer`) on these sentences: the same kind of tokenizer,
    in a second instead of the default model's minute-long build."""
    if tokenizer_dir is None:
        return _byte_level_bpe()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_tokenizer(tokenizer_dir: Path | None, out_dir: Path) -> None:
    """Put the tokenizer of :func:`load_tokenizer` into the checkpoint ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        from fedlora.model import portable_tokenizer_class

        _byte_level_bpe().save_pretrained(str(out_dir))
        portable_tokenizer_class(out_dir / "tokenizer_config.json")
        return
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy2(Path(tokenizer_dir) / name, out_dir / name)


def encode(tokenizer: Any, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)`` of ``texts``, ``length`` tokens at most."""
    batch = tokenizer(
        texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
    )
    return batch["input_ids"], batch["attention_mask"]


def heldout(
    tokenizer_dir: Path | None = None, *, count: int = 24, length: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out sentences (not trained on) for measuring a :func:`tiny_checkpoint`."""
    tokenizer = load_tokenizer(tokenizer_dir)
    return encode(tokenizer, sentences(10_001, count), length)


def tiny_config(family: str, tokenizer: Any, *, hidden: int = 64) -> Any:
    """A 2-layer config of ``family``: 4 query heads on 2 KV heads of ``hidden / 4``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: choose from {sorted(FAMILIES)}")
    base = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if family == "phi3":
        base.pop("head_dim")  # Phi-3 derives it
    return FAMILIES[family](base)


def tiny_checkpoint(
    family: str,
    out_dir: Path,
    *,
    tokenizer_dir: Path | None = None,
    seed: int = 0,
    steps: int = 60,
    hidden: int = 64,
    tie: bool | None = None,
) -> Path:
    """Write a trained tiny ``family`` checkpoint (safetensors + tokenizer) to ``out_dir``.

    ``tie``: tie the embeddings or not (default: as the family's best-known models do).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tokenizer_dir)
    config = tiny_config(family, tokenizer, hidden=hidden)
    if tie is not None:
        config.tie_word_embeddings = tie
    ids, mask = encode(tokenizer, sentences(seed, 48), 32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        _fit(model, ids, mask, steps=steps, lr=3e-3)
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(tokenizer_dir, out)
    return out


def _fit(model: Any, ids: torch.Tensor, mask: torch.Tensor, *, steps: int, lr: float) -> None:
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def lora_adapter(base_dir: Path, out_dir: Path, *, seed: int = 1, scale: float = 0.02) -> Path:
    """A LoRA adapter on every linear layer of ``base_dir`` with seeded nonzero weights, saved
    to ``out_dir``: what a fedlora run leaves for the export to merge."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), local_files_only=True)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)
