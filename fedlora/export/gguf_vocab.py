"""The tokenizer of a GGUF file: token table, merges or scores, special ids, chat template.

:func:`check_tokenizer` refuses, in one line and without writing anything, a tokenizer
this module cannot write; :func:`add_tokenizer` writes it into a ``gguf.GGUFWriter`` so
that llama.cpp tokenizes text exactly as the model's own tokenizer does (the export's
tokenization check compares the two).

The tokenizer is read as ``transformers.AutoTokenizer`` loads it (the pipeline of its
backend ``tokenizers.Tokenizer``, which a tokenizer class may rebuild from
``tokenizer.json``), because that is what the model was trained with. Two kinds:

* **Byte-level BPE** (GPT-2, SmolLM2, Llama-3, Qwen2.5): llama.cpp's ``gpt2`` model with
  the merges, and a pre-tokenizer llama.cpp knows by name, identified here from the
  pre-tokenizer's structure and regex (:data:`BPE_PRE_TOKENIZERS`).
* **SentencePiece-style BPE** (TinyLlama, Llama-2, Mistral, Phi-3, Gemma 2/3): byte
  fallback, ``▁`` for spaces, with or without a ``▁`` prefix. llama.cpp's ``llama``
  model merges any two adjacent pieces that form a piece, highest score first; the
  score of a piece is minus the rank of the first merge that makes it, so llama.cpp
  merges in the order of ``tokenizer.json``'s merges.

Special token ids, ``add_bos`` / ``add_eos`` and the chat template are written by
``gguf.SpecialVocab``, with the loaded tokenizer's own BOS / EOS / UNK / PAD ids and
whether it adds BOS / EOS to a text (what it does, not what its files say).

Gaps that remain where llama.cpp cannot do what Hugging Face does (no GGUF key says
otherwise), each pinned by a test:

* text that NFC normalization would change, for a tokenizer with an NFC normalizer
  (Qwen2.5): llama.cpp does not normalize;
* a ``▁`` prefix put by a ``Metaspace`` pre-tokenizer (transformers 5 loads every
  ``LlamaTokenizer`` so): none on a text that starts with a space, and with
  ``prepend_scheme "first"`` (``legacy=False``) none after a special token in a prompt
  parsed for special tokens; llama.cpp prefixes both, as SentencePiece does;
* whitespace beside a special token marked ``lstrip`` / ``rstrip`` (Phi-3's): Hugging
  Face strips it, llama.cpp keeps it. A non-special added token so marked is refused, as
  it would change how any text tokenizes.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.errors import ModelError

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
BYTES_ONLY = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
DIGITS = {"type": "Digits", "individual_digits": True}


def _split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


BPE_PRE_TOKENIZERS: dict[str, tuple[list[dict[str, Any]], bool]] = {
    "gpt-2": ([BYTE_LEVEL], False),
    "smollm": ([DIGITS, BYTE_LEVEL], False),
    "llama-bpe": ([_split(LLAMA3_REGEX), BYTES_ONLY], True),
    "qwen2": ([_split(QWEN2_REGEX), BYTES_ONLY], False),
}
"""llama.cpp's name of a byte-level BPE pre-tokenizer → the ``tokenizer.json`` pre-tokenizer
steps that are it (the keys shown must match) and ``ignore_merges`` as llama.cpp applies it
for that name (Llama-3 takes a whole pre-token in the vocabulary as one token)."""

SUPPORTED = (
    "byte-level BPE with the GPT-2, SmolLM, Llama-3 or Qwen2 pre-tokenizer "
    f"(llama.cpp {', '.join(BPE_PRE_TOKENIZERS)}), or SentencePiece-style BPE "
    "(byte fallback, '▁' for spaces)"
)
SPIECE = "▁"
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


@dataclass(frozen=True)
class TokenizerKind:
    """How llama.cpp is to run a tokenizer: ``model`` ``gpt2`` or ``llama`` (GGUF
    ``tokenizer.ggml.model``), ``pre`` (``tokenizer.ggml.pre``), and for ``llama``
    whether a ``▁`` is put before the text (``tokenizer.ggml.add_space_prefix``)."""

    model: str
    pre: str
    add_space_prefix: bool = False


def check_tokenizer(model_dir: Path) -> None:
    """Refuse (:class:`ModelError`, one line) a tokenizer :func:`add_tokenizer` cannot write."""
    _, spec = _load(model_dir)
    tokenizer_kind(spec, model_dir)


def tokenizer_kind(spec: dict[str, Any], model_dir: Path) -> TokenizerKind:
    """The kind of a tokenizer pipeline (``tokenizer.json`` form), or refuse it in one line."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        _refuse(model_dir, f"a {model.get('type')} model")
    for token in spec.get("added_tokens", []):
        if not token["special"] and any(token.get(k) for k in ("lstrip", "rstrip", "single_word")):
            _refuse(
                model_dir,
                f"one with the added token {token['content']!r} matched with lstrip, rstrip or "
                "single_word, which llama.cpp does not do",
            )
    if model.get("byte_fallback"):
        if model.get("ignore_merges"):
            _refuse(model_dir, "a byte-fallback BPE with ignore_merges")
        return TokenizerKind("llama", "default", _space_prefix(spec, model_dir))
    pre = _steps(spec.get("pre_tokenizer"), "pretokenizers")
    for name, (steps, ignore_merges) in BPE_PRE_TOKENIZERS.items():
        if len(pre) == len(steps) and all(_has(p, s) for p, s in zip(pre, steps, strict=True)):
            if bool(model.get("ignore_merges")) != ignore_merges:
                _refuse(
                    model_dir,
                    f"a byte-level BPE with the {name} pre-tokenizer but ignore_merges "
                    f"{not ignore_merges}",
                )
            if spec.get("normalizer") not in (None, {"type": "NFC"}):
                _refuse(model_dir, f"a byte-level BPE with normalizer {_brief(spec['normalizer'])}")
            return TokenizerKind("gpt2", name)
    return _refuse(
        model_dir, f"a byte-level BPE with pre-tokenizer {_brief(spec.get('pre_tokenizer'))}"
    )


def _space_prefix(spec: dict[str, Any], model_dir: Path) -> bool:
    """Whether a SentencePiece-style pipeline puts ``▁`` before a text; refuse one that does
    not only turn spaces into ``▁`` (and maybe prefix one), all of a text as one piece."""
    norm = _steps(spec.get("normalizer"), "normalizers")
    pre = _steps(spec.get("pre_tokenizer"), "pretokenizers")
    to_spiece = {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE}
    prefix = {"type": "Prepend", "prepend": SPIECE}
    metaspace = {"type": "Metaspace", "replacement": SPIECE, "split": False}
    noop_split = {"type": "Split", "pattern": {"String": " "}}  # Gemma: no spaces left to split
    if not pre and norm in ([prefix, to_spiece], [to_spiece]):
        return norm[0] == prefix
    if not norm and len(pre) == 1 and _has(pre[0], metaspace):
        return pre[0].get("prepend_scheme", "always") != "never"
    if norm == [to_spiece] and len(pre) == 1 and _has(pre[0], noop_split):
        return False
    return _refuse(
        model_dir,
        f"a byte-fallback BPE with normalizer {_brief(spec.get('normalizer'))} "
        f"and pre-tokenizer {_brief(spec.get('pre_tokenizer'))}",
    )


def add_tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> None:
    """Write ``model_dir``'s tokenizer into ``writer``, its table padded to ``vocab_size``."""
    from gguf import SpecialVocab

    hf, spec = _load(model_dir)
    kind = tokenizer_kind(spec, model_dir)
    tokens, scores, types = _token_table(spec, vocab_size, model_dir)
    writer.add_tokenizer_model(kind.model)
    writer.add_tokenizer_pre(kind.pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind.model == "llama":
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(kind.add_space_prefix)
    # SpecialVocab logs what it skips in tokenizer.json's post-processor (a pair template's
    # separators) at WARNING; the ids and add_bos/eos it misses are set below from the
    # loaded tokenizer, so that is not news to a user.
    quiet = logging.getLogger("gguf.vocab")
    if quiet.level == logging.NOTSET:
        quiet.setLevel(logging.ERROR)
    special = SpecialVocab(model_dir, load_merges=kind.model == "gpt2", n_vocab=vocab_size)
    for role in ("bos", "eos", "unk", "pad"):  # the loaded tokenizer's, where it has one
        if getattr(hf, f"{role}_token_id", None) is not None:
            special.special_token_ids[role] = int(getattr(hf, f"{role}_token_id"))
    probe = list(hf("a")["input_ids"])
    for role, edge in (("bos", probe[:1]), ("eos", probe[-1:])):
        token_id = special.special_token_ids.get(role)
        special.add_special_token[role] = token_id is not None and edge == [token_id]
    special.add_to_gguf(writer, quiet=True)


def _token_table(
    spec: dict[str, Any], vocab_size: int, model_dir: Path
) -> tuple[list[str], list[float], list[int]]:
    """Token texts, scores and ``gguf.TokenType`` of ids ``0 .. vocab_size - 1``.

    Added tokens are ``CONTROL`` (special) or ``USER_DEFINED`` (matched in any text, as
    Hugging Face does); ``<0x..>`` of a byte-fallback model are ``BYTE``; ids the tokenizer
    lacks are ``[PAD<id>]`` ``UNUSED``. A score is minus the rank of the first merge making
    the token (0 for a token no merge makes): only the ``llama`` model reads scores.
    """
    from gguf import TokenType

    model = spec["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id.update((i, t["content"]) for i, t in added.items())
    if max(by_id) >= vocab_size:
        raise ModelError(
            f"{model_dir / 'tokenizer.json'} has token ids up to {max(by_id)}, beyond the "
            f"model's vocab_size {vocab_size}"
        )
    score: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        score.setdefault(left + right, -float(rank + 1))
    fallback = bool(model.get("byte_fallback"))
    if fallback and not all(f"<0x{b:02X}>" in model["vocab"] for b in range(256)):
        _refuse(model_dir, "a byte-fallback BPE without all 256 <0x..> byte tokens")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(text)
            types.append(TokenType.CONTROL if added[i]["special"] else TokenType.USER_DEFINED)
        else:
            tokens.append(text)
            types.append(
                TokenType.BYTE if fallback and BYTE_TOKEN.fullmatch(text) else TokenType.NORMAL
            )
        scores.append(score.get(tokens[-1], 0.0) if types[-1] == TokenType.NORMAL else 0.0)
    return tokens, scores, [int(t) for t in types]


def _load(model_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The tokenizer as transformers loads it, and its backend's pipeline as ``tokenizer.json``."""
    from transformers import AutoTokenizer

    file = model_dir / "tokenizer.json"
    if not file.is_file():
        raise ModelError(f"GGUF export needs the fast tokenizer's {file}: none there")
    try:
        hf = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        spec: dict[str, Any] = json.loads(hf.backend_tokenizer.to_str())
    except (OSError, ValueError, AttributeError) as err:
        raise ModelError(f"GGUF export cannot load the tokenizer in {model_dir}: {err}") from None
    return hf, spec


def _steps(step: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """A normalizer or pre-tokenizer as its list of steps (a ``Sequence`` flattened)."""
    if step is None:
        return []
    if step.get("type") == "Sequence":
        return [s for inner in step[key] for s in _steps(inner, key)]
    return [step]


def _has(step: dict[str, Any], required: dict[str, Any]) -> bool:
    return all(step.get(key) == value for key, value in required.items())


def _brief(step: Any) -> str:
    text = json.dumps(step, ensure_ascii=False)
    return text if len(text) <= 160 else text[:157] + "..."


def _refuse(model_dir: Path, what: str) -> Any:
    raise ModelError(f"GGUF export supports {SUPPORTED}; the tokenizer in {model_dir} is {what}")
