"""Held-out loss of a causal LM: the number every eval in fedlora reports."""

from __future__ import annotations

import math

import torch
from torch import nn


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
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, int(input_ids.shape[0]), batch_size):
            ids = input_ids[start : start + batch_size]
            mask = attention_mask[start : start + batch_size]
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            targets = ids[:, 1:]
            tmask = mask[:, 1:].bool()
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)),
                targets.reshape(-1),
                reduction="none",
            ).view_as(targets)
            total += float(loss[tmask].sum())
            count += int(tmask.sum())
    finally:
        model.train(was_training)
    return total / count if count else math.nan
