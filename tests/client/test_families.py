"""Every model family users bring trains correctly: default LoRA targets, exact per-sample grads.

Each family is a tiny random-init model built from its transformers config (2 layers,
grouped-query attention where the family has it, sliding windows shorter than the
sequences where it has them). The per-sample gradients that DP-SGD clips, computed the
way ``train_lora`` computes them (its loss, its sampler), must equal a loop of
one-sequence backward passes on each sequence alone, unpadded: nothing may couple the
sequences of a batch (padding, attention masks, position ids, embedding scaling,
sliding windows, logit soft-capping).

The comparison runs in float64, where any coupling stands far above rounding (the two
differ by about 1e-16 of the largest gradient; in float32, by 1-5e-6, as batched and
single-sequence matmuls round differently). A float64 Gemma-2 cannot hold a padded query
whose whole sliding window is padding (its eager attention takes the softmax in float32,
where float64's mask value is -inf: NaN, and 0·NaN reaches the real tokens), so there the
windows are longer than any padding; the case itself is checked in float32, the dtype
fedlora trains in, where the mask value is finite.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedlora.adapter import attach_lora, lora_targets
from fedlora.client.train import LinearGradSampler, grad_sampler, sequence_losses
from fedlora.config import LLAMA_LINEAR_MODULES, LoraSettings

VOCAB = 64
SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
PHI3 = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

#: family -> (config class, extra config, the LoRA targets it gets by default)
FAMILIES: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "llama": ("LlamaConfig", {}, LLAMA_LINEAR_MODULES),
    "qwen2": ("Qwen2Config", {}, LLAMA_LINEAR_MODULES),  # q/k/v have (frozen) biases
    "qwen3": ("Qwen3Config", {"head_dim": 8}, LLAMA_LINEAR_MODULES),
    "mistral": ("MistralConfig", {}, LLAMA_LINEAR_MODULES),
    "gemma": ("GemmaConfig", {"head_dim": 8}, LLAMA_LINEAR_MODULES),
    "gemma2": (
        "Gemma2Config",
        {"head_dim": 8, "query_pre_attn_scalar": 8},
        LLAMA_LINEAR_MODULES,
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        {
            "head_dim": 8,
            "query_pre_attn_scalar": 8,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        LLAMA_LINEAR_MODULES,
    ),
    "phi3": ("Phi3Config", {}, PHI3),
}
SLIDING = ("mistral", "gemma2", "gemma3_text")
LENGTHS = (12, 10, 7, 5)  # right-padded to 12
WINDOW = 8  # some sequences are longer, every padding is shorter
LONG_PADDING = (12, 9, 5, 2)  # padding longer than SHORT_WINDOW
SHORT_WINDOW = 4


def _model(
    family: str, seed: int = 0, dtype: torch.dtype = torch.float64, window: int = WINDOW
) -> Any:
    """The family's tiny causal LM with the default LoRA adapter, every LoRA tensor random
    (a fresh lora_B is zero, which would make every lora_A gradient zero)."""
    import transformers

    name, extra, _ = FAMILIES[family]
    if family in SLIDING:
        extra = {**extra, "sliding_window": window}
    config = getattr(transformers, name)(**SMALL, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = transformers.AutoModelForCausalLM.from_config(config)
        model = attach_lora(base, LoraSettings(r=4, alpha=8), seed=seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0.0, 0.2)
    return model.to(dtype).train()


def _batch(lengths: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


def _one_at_a_time(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample gradients by a backward pass per sequence, alone and unpadded."""
    params = [p for p in model.parameters() if p.requires_grad]
    per_example = []
    for i, n in enumerate(mask.sum(dim=1).tolist()):
        loss = sequence_losses(model, ids[i : i + 1, :n], mask[i : i + 1, :n]).sum()
        per_example.append(torch.autograd.grad(loss, params))
    return [torch.stack(gs) for gs in zip(*per_example, strict=True)]


def per_sample_error(
    family: str,
    mode: str,
    dtype: torch.dtype = torch.float64,
    lengths: tuple[int, ...] = LENGTHS,
    window: int = WINDOW,
) -> tuple[float, type]:
    """max |sampler − loop| / max |loop| over every LoRA tensor, and the sampler's type."""
    model = _model(family, dtype=dtype, window=window)
    ids, mask = _batch(lengths)
    expected = _one_at_a_time(model, ids, mask)

    sampler = grad_sampler(model, mode)  # type: ignore[arg-type]
    try:
        sampler.backward(sequence_losses(sampler, ids, mask).sum())
        got = [p.grad_sample.detach().clone() for p in model.parameters() if p.requires_grad]
    finally:
        sampler.close()

    scale = max(float(e.abs().max()) for e in expected)
    assert scale > 0
    diff = max(float((g - e).abs().max()) for g, e in zip(got, expected, strict=True))
    return diff / scale, type(sampler)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_targets_are_the_familys_attention_and_mlp_projections(family: str) -> None:
    model = _model(family)

    targets = lora_targets(model)

    assert sorted(targets) == sorted(FAMILIES[family][2])  # listed in the model's order
    adapted = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert not any("lm_head" in n or "embed" in n for n in adapted)
    assert len(adapted) == 2 * SMALL["num_hidden_layers"] * len(targets)  # lora_A + lora_B


@pytest.mark.parametrize("mode", ["auto", "opacus"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_per_sample_gradients_equal_one_sequence_at_a_time(family: str, mode: str) -> None:
    error, kind = per_sample_error(family, mode)

    assert (kind is LinearGradSampler) == (mode == "auto")
    assert error <= 1e-10, f"{family} ({mode}): relative error {error:.2e}"


@pytest.mark.parametrize("family", SLIDING)
def test_padding_longer_than_the_sliding_window_couples_nothing_in_float32(family: str) -> None:
    error, _ = per_sample_error(
        family, "auto", torch.float32, lengths=LONG_PADDING, window=SHORT_WINDOW
    )

    assert error <= 1e-5, f"{family}: relative error {error:.2e}"
