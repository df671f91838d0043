"""Small tokenizers of each family fedlora exports, trained here with no download.

:func:`build_tokenizer` trains a tokenizer of a family on ``texts`` with the
``tokenizers`` library and saves it as ``tokenizer.json`` + ``tokenizer_config.json``
(with a chat template) that ``transformers.AutoTokenizer`` loads. Each family has the
normalizer, pre-tokenizer, decoder, special tokens and BOS/EOS behaviour of the real
models it stands for, with a vocabulary of a few hundred to a few thousand tokens:

* ``gpt2``: byte-level BPE, GPT-2 regex (the embedded default model's kind); no BOS.
* ``smollm``: SmolLM2's byte-level BPE: digits split one by one before the GPT-2 regex.
  Saved as ``PreTrainedTokenizerFast``, which runs ``tokenizer.json`` as it is: SmolLM2's
  own ``GPT2Tokenizer`` class makes transformers 5 drop the digit split.
* ``llama3``: Llama-3's regex ``Split`` + byte-level BPE with ``ignore_merges``; BOS added.
* ``qwen2``: Qwen2.5's regex ``Split`` (one digit a token) + byte-level BPE, NFC; no BOS.
* ``llama-spm``: TinyLlama / Llama-2 / Mistral / Phi-3: SentencePiece BPE as Hugging Face
  converts it (``▁`` for spaces and a prefix ``▁``, byte fallback to ``<0x..>`` tokens,
  merges ordered by the merged piece's rank); ``<s>`` added. ``tokenizer.json`` prefixes
  ``▁`` with a ``Prepend`` normalizer; its ``LlamaTokenizer`` class (``legacy=False``, as
  TinyLlama's) makes transformers 5 run ``Metaspace(prepend_scheme="first")`` instead.
* ``gemma``: Gemma 2/3: SentencePiece BPE with no prefix ``▁``, ``<bos>`` added,
  ``<start_of_turn>`` / ``<end_of_turn>`` and a user-defined ``<table>`` among its tokens.

The SentencePiece families are trained as BPE within ``▁``-words, then their merges are
rebuilt from the vocabulary the way ``transformers``' SentencePiece converter does, so
any two adjacent pieces that form a piece merge, the best-ranked first.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FAMILIES = ("gpt2", "smollm", "llama3", "qwen2", "llama-spm", "gemma")

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA2_CHAT = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }}"
    " [/INST]{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)
GEMMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
    "else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_tokenizer(
    family: str, out_dir: Path, texts: Iterable[str], *, vocab_size: int = 1000
) -> Path:
    """Train a ``family`` tokenizer on ``texts``, save it in ``out_dir``; returns ``out_dir``."""
    builders = {
        "gpt2": _gpt2,
        "smollm": _smollm,
        "llama3": _llama3,
        "qwen2": _qwen2,
        "llama-spm": _llama_spm,
        "gemma": _gemma,
    }
    if family not in builders:
        raise ValueError(f"unknown tokenizer family {family!r}: choose from {FAMILIES}")
    core, config = builders[family](list(texts), vocab_size)
    _save(core, config, Path(out_dir))
    return Path(out_dir)


# ------------------------------------------------------------------ byte-level BPE families


def _byte_level_bpe(
    texts: list[str],
    vocab_size: int,
    pre_tokenizer: Any,
    *,
    specials_first: list[str],
    ignore_merges: bool = False,
) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    core.pre_tokenizer = pre_tokenizer
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials_first,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return core


def _gpt2(texts: list[str], vocab_size: int) -> tuple[Any, dict[str, Any]]:
    from tokenizers import pre_tokenizers

    end = "<|endoftext|>"
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core = _byte_level_bpe(texts, vocab_size, pre, specials_first=[])
    core.add_special_tokens([end])  # GPT-2's one special token comes after the vocabulary
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": end,
        "eos_token": end,
        "unk_token": end,
        "chat_template": CHATML,
    }
    return core, config


def _smollm(texts: list[str], vocab_size: int) -> tuple[Any, dict[str, Any]]:
    from tokenizers import pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    core = _byte_level_bpe(texts, vocab_size, pre, specials_first=specials)
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "chat_template": CHATML,
    }
    return core, config


def _split_then_bytes(pattern: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _llama3(texts: list[str], vocab_size: int) -> tuple[Any, dict[str, Any]]:
    from tokenizers import processors

    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    core = _byte_level_bpe(
        texts, vocab_size, _split_then_bytes(LLAMA3_PATTERN), specials_first=[], ignore_merges=True
    )
    core.add_special_tokens([bos, eos, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    core.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, core.token_to_id(bos))],
            ),
        ]
    )
    config = {"bos_token": bos, "eos_token": "<|eot_id|>", "chat_template": LLAMA3_CHAT}
    return core, config


def _qwen2(texts: list[str], vocab_size: int) -> tuple[Any, dict[str, Any]]:
    from tokenizers import normalizers

    core = _byte_level_bpe(texts, vocab_size, _split_then_bytes(QWEN2_PATTERN), specials_first=[])
    core.normalizer = normalizers.NFC()
    core.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": CHATML,
    }
    return core, config


# ------------------------------------------------------------------ SentencePiece-style families


def _spm_bpe(
    texts: list[str],
    vocab_size: int,
    *,
    specials: list[str],
    prefix_space: bool,
    bos: str,
    unk: str,
) -> Any:
    """A SentencePiece BPE as ``tokenizer.json``: specials, 256 byte tokens, pieces."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    # Pieces learned within ▁-words (SentencePiece never merges across a space).
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Replace(" ", "▁")
    learner.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always" if prefix_space else "never", split=True
    )
    n_fixed = len(specials) + 256
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_fixed, min_frequency=2, show_progress=False
    )
    learner.train_from_iterator(texts, trainer=trainer)
    learned = sorted(learner.get_vocab().items(), key=lambda item: item[1])
    vocab = {token: i for i, token in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece, _ in learned:
        vocab.setdefault(piece, len(vocab))
    core = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_spm_merges(vocab, n_fixed),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    steps = [normalizers.Replace(" ", "▁")]
    core.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), *steps] if prefix_space else steps
    )
    core.pre_tokenizer = None
    strip = [decoders.Strip(content=" ", left=1, right=0)] if prefix_space else []
    core.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    core.add_special_tokens(specials)
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0",
        pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, vocab[bos])],
    )
    return core


def _spm_merges(vocab: dict[str, int], first_piece: int) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, best-ranked (lowest id) piece first: the
    merges ``transformers`` derives from a SentencePiece model's scores."""
    merges = []
    for piece, rank in vocab.items():
        if rank < first_piece:
            continue
        splits = [
            (piece[:i], piece[i:])
            for i in range(1, len(piece))
            if vocab.get(piece[:i], -1) >= first_piece and vocab.get(piece[i:], -1) >= first_piece
        ]
        merges += sorted(splits, key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    return merges


def _llama_spm(texts: list[str], vocab_size: int) -> tuple[Any, dict[str, Any]]:
    specials = ["<unk>", "<s>", "</s>"]
    core = _spm_bpe(texts, vocab_size, specials=specials, prefix_space=True, bos="<s>", unk="<unk>")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "chat_template": LLAMA2_CHAT,
    }
    return core, config


def _gemma(texts: list[str], vocab_size: int) -> tuple[Any, dict[str, Any]]:
    from tokenizers import AddedToken

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    core = _spm_bpe(
        texts, vocab_size, specials=specials, prefix_space=False, bos="<bos>", unk="<unk>"
    )
    core.add_tokens([AddedToken("<table>", special=False, normalized=False)])
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "chat_template": GEMMA_CHAT,
    }
    return core, config


# ------------------------------------------------------------------ saving


def _save(core: Any, config: dict[str, Any], out_dir: Path) -> None:
    """``tokenizer.json`` as trained and a ``tokenizer_config.json`` naming its special tokens,
    the real models' tokenizer class (``PreTrainedTokenizerFast`` where they name none) and
    the chat template. transformers 5 rebuilds some classes' pipelines (``LlamaTokenizer``:
    ``Metaspace``, ``GemmaTokenizer``: a ``Split``) from the vocabulary and merges."""
    out_dir.mkdir(parents=True, exist_ok=True)
    core.save(str(out_dir / "tokenizer.json"))
    added = json.loads(core.to_str())["added_tokens"]
    full = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "added_tokens_decoder": {
            str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added
        },
        **config,
    }
    text = json.dumps(full, indent=2, ensure_ascii=False) + "\n"
    (out_dir / "tokenizer_config.json").write_text(text, encoding="utf-8")
