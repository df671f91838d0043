"""The tokenizer of a GGUF file: vocabulary, merges, token types, special ids.

:func:`check_tokenizer` refuses, in one line and without writing anything, a
tokenizer this module cannot write; :func:`add_tokenizer` writes it into a
``gguf.GGUFWriter`` so that llama.cpp tokenizes text exactly as the model's own
tokenizer does (the export's tokenization check compares the two).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedlora.errors import ModelError


def check_tokenizer(model_dir: Path) -> None:
    """Refuse (:class:`ModelError`, one line) a tokenizer :func:`add_tokenizer` cannot write."""
    file = model_dir / "tokenizer.json"
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"GGUF export needs a readable {file}: {err}") from None
    if spec.get("model", {}).get("type") != "BPE":
        raise ModelError(f"GGUF export supports BPE tokenizers; {file} is not one")
    _pre_tokenizer_name(spec.get("pre_tokenizer"))


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for the pre-tokenizer regex, for the byte-level BPE ones it knows."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    raise ModelError(
        "GGUF export supports byte-level BPE tokenizers with the GPT-2 pre-tokenizer "
        f"(tokenizer.json pre_tokenizer ByteLevel, use_regex true); got {pre!r}"
    )


def add_tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> None:
    from gguf import TokenType
    from tokenizers import Tokenizer

    file = model_dir / "tokenizer.json"
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
        tokenizer = Tokenizer.from_file(str(file))
    except (OSError, ValueError, Exception) as err:
        raise ModelError(f"GGUF export needs a readable {file}: {err}") from None
    if spec.get("model", {}).get("type") != "BPE":
        raise ModelError(f"GGUF export supports BPE tokenizers; {file} is not one")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise ModelError(f"{file} has token ids beyond the model's vocab_size {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i]["special"] else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    config = _tokenizer_config(model_dir)
    ids: dict[str, int] = {}
    for role in ("bos", "eos", "unk", "pad"):
        token = config.get(f"{role}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and token in vocab:
            ids[role] = vocab[token]
    for role, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if role in ids:
            add(ids[role])
    probe = tokenizer.encode("a", add_special_tokens=True).ids
    writer.add_add_bos_token("bos" in ids and probe[:1] == [ids["bos"]])
    writer.add_add_eos_token("eos" in ids and probe[-1:] == [ids["eos"]])


def _tokenizer_config(model_dir: Path) -> dict[str, Any]:
    file = model_dir / "tokenizer_config.json"
    if not file.is_file():
        return {}
    config: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
    return config
