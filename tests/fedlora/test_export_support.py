"""A tiny trained LLaMA, its tokenizer and a LoRA adapter on disk, for the export tests.

The base is trained for a few dozen steps to memorise a small corpus, so its
next-token distributions are peaked like a real model's: with a freshly
initialised model every logit is ~0, near-ties decide "top-1 agreement" and the
gate tests would measure noise.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

WORDS = [f"w{i}" for i in range(200)]


@dataclass(frozen=True)
class Tiny:
    base: Path
    adapter: Path
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def _sentences(seed: int, count: int = 24) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(8, 20))) for _ in range(count)]


def _tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def llama_config(hidden: int = 64, layers: int = 2, tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=300,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )


def save_adapter(base_model, out: Path, *, seed: int, scale: float = 0.05) -> Path:
    """Attach a LoRA to ``base_model`` (in place), give it nonzero weights and save it."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"
    )
    model = get_peft_model(base_model, lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def fit_briefly(model, ids, mask, *, steps: int, lr: float) -> None:
    """Train a tiny test model for a few full-batch AdamW steps, so its logits mean something."""
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def build_tiny(root: Path, *, seed: int = 0, tie: bool = False, steps: int = 20) -> Tiny:
    """Train and save a tiny base (+ tokenizer) and a LoRA adapter under ``root``."""
    from transformers import LlamaForCausalLM

    texts = _sentences(seed)
    tokenizer = _tokenizer(texts)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tie=tie))
    fit_briefly(model, ids, mask, steps=steps, lr=1e-2)

    base = root / "base"
    model.save_pretrained(str(base), safe_serialization=True)
    tokenizer.save_pretrained(str(base))
    adapter = save_adapter(model, root / "adapter", seed=seed + 1)
    return Tiny(base=base, adapter=adapter, input_ids=ids, attention_mask=mask)


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Run these tiny models on one thread (import this fixture into each export test module).

    On a loaded 2-core machine torch's second OpenMP thread spins against other
    processes and makes a 64-wide model ~50x slower; one thread is also faster unloaded.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_BUILT: dict[tuple[int, bool], Tiny] = {}


def tiny_setup(factory: pytest.TempPathFactory, *, seed: int = 0, tie: bool = False) -> Tiny:
    """:func:`build_tiny`, built once per test session; tests must only read it."""
    key = (seed, tie)
    if key not in _BUILT:
        _BUILT[key] = build_tiny(factory.mktemp(f"tiny-{seed}-{tie}"), seed=seed, tie=tie)
    return _BUILT[key]


def test_tiny_base_is_confident_on_the_heldout_tokens(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from transformers import AutoModelForCausalLM

    tiny = tiny_setup(tmp_path_factory)
    model = AutoModelForCausalLM.from_pretrained(str(tiny.base), local_files_only=True).eval()

    with torch.no_grad():
        logits = model(input_ids=tiny.input_ids, attention_mask=tiny.attention_mask).logits
    top2 = logits.topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1])[tiny.attention_mask.bool()]

    assert (
        tiny.attention_mask.sum() > 250
    )  # enough positions for a 0.98 agreement to mean something
    assert (tiny.attention_mask == 0).any()  # and some padding for the mask to matter
    assert margin.median() > 1.0
