"""Held-out loss of a causal LM: the number every eval in fedlora reports."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn


def _token_losses(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch of rows: each next-token cross-entropy (nats) and which targets are real,
    both ``[rows, seq_len - 1]``; the model in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, int(input_ids.shape[0]), batch_size):
            ids = input_ids[start : start + batch_size]
            mask = attention_mask[start : start + batch_size]
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            targets = ids[:, 1:]
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)),
                targets.reshape(-1),
                reduction="none",
            ).view_as(targets)
            yield loss, mask[:, 1:].bool()
    finally:
        model.train(was_training)


@torch.no_grad()
def mean_token_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    batch_size: int = 64,
) -> float:
    """Mean next-token cross-entropy (nats) over every real target token.

    Token-weighted across the whole set, so it is comparable between runs and
    with perplexity (``exp`` of it). Returns NaN for an empty set.
    """
    total, count = 0.0, 0
    for loss, real in _token_losses(model, input_ids, attention_mask, batch_size):
        total += float(loss[real].sum())
        count += int(real.sum())
    return total / count if count else math.nan


@torch.no_grad()
def record_losses(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 64
) -> np.ndarray:
    """Mean next-token cross-entropy (nats) of each row over its own real target tokens."""
    out = [
        ((loss * real).sum(1) / real.sum(1).clamp(min=1)).double().numpy()
        for loss, real in _token_losses(model, input_ids, attention_mask, batch_size)
    ]
    return np.concatenate(out) if out else np.zeros(0)
