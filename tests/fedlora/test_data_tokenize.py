"""One record, one row: BOS + tokens + EOS, truncated, right-padded, masked."""

from __future__ import annotations

import pytest
import torch

from fedlora.data.synthetic import default_records
from fedlora.data.tokenize import encode_texts
from fedlora.errors import ConfigError
from fedlora.model import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    texts = [r.text for r in default_records(1, seed=0, split="public", num_records=400)]
    return train_tokenizer(texts, vocab_size=400, max_length=64)


def test_each_text_is_one_row_with_bos_eos_padding_and_mask(tokenizer) -> None:
    texts = ["Buy milk.", "Call Zoë at 6pm, then walk the dog before it rains."]

    ids, mask = encode_texts(tokenizer, texts, seq_len=40)

    assert ids.shape == mask.shape == (2, 40) and ids.dtype == mask.dtype == torch.long
    for row, text in enumerate(texts):
        n = int(mask[row].sum())
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids[row, :n].tolist() == [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id]
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (ids[row, n:] == tokenizer.pad_token_id).all()
        assert tokenizer.decode(ids[row, 1 : n - 1]) == text


def test_long_text_is_truncated_never_split_into_more_rows(tokenizer) -> None:
    long_text = " ".join(["Water the basil every morning this week."] * 20)

    ids, mask = encode_texts(tokenizer, [long_text, "Hi."], seq_len=16)

    assert ids.shape == (2, 16)
    assert mask[0].all() and ids[0, 0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id not in ids[0].tolist()


def test_no_texts_gives_empty_batch_and_bad_seq_len_is_refused(tokenizer) -> None:
    ids, mask = encode_texts(tokenizer, [], seq_len=8)

    assert ids.shape == mask.shape == (0, 8)
    with pytest.raises(ConfigError, match="seq_len"):
        encode_texts(tokenizer, ["x"], seq_len=1)
