"""How much a run learned each canary: its loss under the initial adapter minus the final.

The score is the loss *reduction*, per canary, so each canary is compared with itself
before training (a canary the base model finds easy is not mistaken for a memorized
one). Black-box in spirit: only the two models' losses on the canary's tokens are used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.config import FedloraConfig
from fedlora.errors import FedloraError
from fedlora.evaluation import record_losses


def vocabulary_words(tokenizer: Any, min_letters: int = 3) -> list[str]:
    """The tokenizer's whole lowercase words that are one token with a leading space
    (byte-level BPE's ``Ġword``), sorted: what canaries are made of."""
    words = set()
    for token in tokenizer.get_vocab():
        word = token[1:] if token.startswith(("Ġ", "▁")) else ""
        if len(word) >= min_letters and word.isalpha() and word.islower() and word.isascii():
            words.add(word)
    return sorted(words)


def final_checkpoint(run_dir: Path) -> Path:
    """The last round's global adapter (``checkpoints/round-NNNN.safetensors``)."""
    found = sorted((run_dir / "checkpoints").glob("round-*.safetensors"))
    if not found:
        raise FedloraError(f"{run_dir}/checkpoints has no adapter checkpoint to audit")
    return found[-1]


def canary_losses(
    cfg: FedloraConfig, texts: Sequence[str], final: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """(loss under the initial adapter, loss under ``final``) of every canary text."""
    from fedlora import runtime
    from fedlora.adapter import set_adapter_arrays
    from fedlora.data.tokenize import encode_texts

    bundle = runtime.model_bundle(cfg)
    ids, mask = encode_texts(bundle.tokenizer, list(texts), cfg.data.seq_len)
    set_adapter_arrays(bundle.model, bundle.initial_arrays)
    before = record_losses(bundle.model, ids, mask)
    set_adapter_arrays(bundle.model, list(final))
    after = record_losses(bundle.model, ids, mask)
    set_adapter_arrays(bundle.model, bundle.initial_arrays)  # leave the shared model as found
    return before, after
