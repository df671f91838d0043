"""Texts to fixed-length token rows, one record per row.

One record is the privacy unit of DP-SGD: per-sample clipping bounds what one
row can change, so a row must hold exactly one record. Records are therefore
never packed together nor split across rows; a long record is truncated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedlora.errors import ConfigError, ModelError


def encode_texts(
    tokenizer: Any, texts: Sequence[str], seq_len: int
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """``(input_ids, attention_mask)`` of shape ``[len(texts), seq_len]``.

    Each row is BOS + tokens + EOS (when the tokenizer has them), truncated to
    ``seq_len`` and right-padded with the pad id; the mask is 0 on padding.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len must be an integer of at least 2, got {seq_len!r}")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ModelError("the tokenizer has no pad or eos token; set tokenizer.pad_token")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    input_ids = torch.full((len(texts), seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(texts), seq_len), dtype=torch.long)
    if texts:
        encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        for row, tokens in enumerate(encoded):
            ids = (bos + list(tokens) + eos)[:seq_len]
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask  # type: ignore[return-value]
