"""GGUF tokenizers of every family: llama.cpp tokenizes as the Hugging Face tokenizer does.

Each family's tokenizer is trained here (:mod:`fedlora.testing.tokenizers`), written
into a vocabulary-only GGUF by :func:`fedlora.export.gguf_vocab.add_tokenizer`, loaded
by llama.cpp with ``vocab_only=True`` and compared token for token with
``transformers.AutoTokenizer`` on hard samples.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from fedlora.errors import ModelError
from fedlora.export import gguf_vocab
from fedlora.testing.tokenizers import FAMILIES, build_tokenizer
from tests.conftest import SHAKESPEARE
from tests.fedlora.test_export_gguf_support import sentences

SAMPLES = [
    "naïve café — 東京 🙂",
    "12345",
    "It's 3.14159, we'll see THEY'RE at 2026-11-28 for $100!",
    "multiple   spaces\tand a tab",
    "line one\nline two\n\n  \nend\n",
    "déjà vu 東京都 👍🏽",
    "",
]
LEADING_SPACE = ["  two leading spaces", " x"]
SPECIAL = {
    "gpt2": "<|endoftext|>Hi there<|endoftext|>",
    "smollm": "<|im_start|>user\nHi 12 there<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>",
    "qwen2": "<|im_start|>user\nHi 12 there<|im_end|>\n<|im_start|>assistant\n",
    "llama-spm": "[INST] Hi there [/INST] ok</s>",  # no text after a special: see below
    "gemma": "<start_of_turn>user\nHi <table> there<end_of_turn>\n<start_of_turn>model\n",
}
KIND = {
    "gpt2": ("gpt2", "gpt-2"),
    "smollm": ("gpt2", "smollm"),
    "llama3": ("gpt2", "llama-bpe"),
    "qwen2": ("gpt2", "qwen2"),
    "llama-spm": ("llama", "default"),
    "gemma": ("llama", "default"),
}
# Trained on too: some merges of multi-byte characters and digits to get right.
EXTRA = ["café naïve façade déjà vu", "東京 東京都 京都", "🙂 👍🏽 🙂", "12345 67890 2026 100"] * 5


@pytest.fixture(scope="module")
def texts() -> list[str]:
    if SHAKESPEARE.is_file():
        play = SHAKESPEARE.read_text(encoding="utf-8")[:100_000].split("\n\n")
    else:
        play = sentences(0, 400)
    return play + EXTRA


@pytest.fixture(scope="module")
def tokenizer_dirs(texts: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {family: build_tokenizer(family, root / family, texts) for family in FAMILIES}


def hf_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def write_vocab_gguf(model_dir: Path, out: Path) -> Path:
    """A GGUF of a tiny llama's hyperparameters and ``model_dir``'s tokenizer, no tensors."""
    import gguf

    n_vocab = len(hf_tokenizer(model_dir))
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(n_vocab)
    gguf_vocab.add_tokenizer(writer, model_dir, n_vocab)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


class Both:
    """One family's tokenizer as Hugging Face and as llama.cpp (from its GGUF) run it."""

    def __init__(self, model_dir: Path, gguf_file: Path) -> None:
        import llama_cpp

        self.hf = hf_tokenizer(model_dir)
        self.gguf_file = gguf_file
        self.llm = llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)

    def hf_ids(self, text: str) -> list[int]:
        return list(self.hf(text)["input_ids"])

    def llama_ids(self, text: str) -> list[int]:
        """llama.cpp's tokens, BOS / EOS as the GGUF says, special tokens parsed (as HF does)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    def differing(self, samples: list[str]) -> list[str]:
        return [text for text in samples if self.llama_ids(text) != self.hf_ids(text)]


@pytest.fixture(scope="module")
def both(
    tokenizer_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Both]:
    out = tmp_path_factory.mktemp("vocab-gguf")
    return {
        family: Both(path, write_vocab_gguf(path, out / f"{family}.gguf"))
        for family, path in tokenizer_dirs.items()
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_tokenizes_hard_samples_as_hugging_face(
    family: str, both: dict[str, Both]
) -> None:
    pair = both[family]
    samples = [*SAMPLES, SPECIAL[family]]
    if family != "llama-spm":
        samples += LEADING_SPACE

    assert pair.differing(samples) == []
    assert all(pair.hf_ids(text) for text in samples if text)  # not vacuous: tokens came out


@pytest.mark.parametrize("family", FAMILIES)
def test_the_gguf_carries_kind_special_ids_bos_and_the_chat_template(
    family: str, both: dict[str, Both], tokenizer_dirs: dict[str, Path]
) -> None:
    from gguf import GGUFReader

    pair = both[family]
    config = json.loads((tokenizer_dirs[family] / "tokenizer_config.json").read_text("utf-8"))

    fields = GGUFReader(str(pair.gguf_file)).fields
    meta = {name: fields[name].contents() for name in fields if name.startswith("tokenizer.")}

    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == KIND[family]
    assert meta["tokenizer.chat_template"] == config["chat_template"]
    assert meta["tokenizer.ggml.eos_token_id"] == pair.hf.eos_token_id == pair.llm.token_eos()
    if pair.hf.bos_token_id is not None:
        assert meta["tokenizer.ggml.bos_token_id"] == pair.hf.bos_token_id == pair.llm.token_bos()
    adds_bos = pair.hf("a")["input_ids"][0] == pair.hf.bos_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is adds_bos
    assert adds_bos is (family in ("llama3", "llama-spm", "gemma"))
    assert meta["tokenizer.ggml.add_eos_token"] is False
    if KIND[family][0] == "llama":
        assert meta["tokenizer.ggml.add_space_prefix"] is (family == "llama-spm")
        assert len(meta["tokenizer.ggml.scores"]) == len(pair.hf)
    else:
        assert len(meta["tokenizer.ggml.merges"]) > 100


def test_a_user_defined_token_is_matched_in_plain_text_and_specials_are_not(
    both: dict[str, Both],
) -> None:
    """What the export's tokenization check runs: llama.cpp not parsing special tokens.
    Hugging Face matches a non-special added token in any text, llama.cpp a
    ``USER_DEFINED`` one; a special (``CONTROL``) token's text is plain text to both."""
    pair = both["gemma"]
    text = "a <table> and <start_of_turn> here"
    hf_plain = list(pair.hf(text, split_special_tokens=True)["input_ids"])

    plain = list(pair.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    assert pair.hf.convert_tokens_to_ids("<table>") in plain
    assert pair.hf.convert_tokens_to_ids("<start_of_turn>") not in plain
    assert plain == hf_plain


def test_text_nfc_would_change_is_the_documented_qwen2_gap(both: dict[str, Both]) -> None:
    """Qwen2.5 normalizes to NFC, llama.cpp does not: a decomposed é tokenizes differently."""
    import unicodedata

    pair = both["qwen2"]
    decomposed = unicodedata.normalize("NFD", "café déjà vu")

    assert pair.llama_ids(decomposed) != pair.hf_ids(decomposed)
    assert pair.llama_ids(unicodedata.normalize("NFC", decomposed)) == pair.hf_ids(decomposed)


def variant(source: Path, out_dir: Path, **config: Any) -> Path:
    """A copy of a tokenizer directory with ``tokenizer_config.json`` entries replaced."""
    shutil.copytree(source, out_dir)
    file = out_dir / "tokenizer_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text("utf-8")), **config}), "utf-8")
    return out_dir


PROMPT_AFTER_SPECIAL = "<s>[INST] Hi there [/INST] ok</s><s>[INST] And?"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_gguf_passes_the_exports_tokenization_check(
    family: str, tokenizer_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Through the export's own path: a tiny llama with the family's tokenizer and 7 more
    embedding rows than tokens (padded ``UNUSED``), written by ``write_f32_gguf``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedlora.export.gguf import LlamaCppModel, tokenization_check, write_f32_gguf

    hf = hf_tokenizer(tokenizer_dirs[family])
    config = LlamaConfig(
        vocab_size=len(hf) + 7,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(str(tmp_path / "model"))
    hf.save_pretrained(str(tmp_path / "model"))
    texts = [text for text in SAMPLES if text]
    batch = [list(hf(text)["input_ids"]) for text in texts]
    width = max(map(len, batch))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in batch])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in batch])

    model = LlamaCppModel(write_f32_gguf(tmp_path / "model", tmp_path / "model.gguf"))
    result = tokenization_check(tmp_path / "model", model, ids, mask)

    assert result == {"texts": len(texts), "identical": len(texts)}
    assert model.llm.n_vocab() == len(hf) + 7
    assert model.llm.metadata["tokenizer.ggml.model"] == KIND[family][0]
    assert model.llm.metadata["tokenizer.chat_template"] == hf.chat_template


def test_sentencepiece_prefix_gaps_are_only_the_documented_ones(both: dict[str, Both]) -> None:
    """transformers 5 runs a Llama tokenizer as ``Metaspace(prepend_scheme="first")``: no
    ``▁`` prefix on a text that starts with a space, nor after a special token. llama.cpp
    (like SentencePiece itself) always prefixes one; no GGUF key says otherwise."""
    pair = both["llama-spm"]

    for text in LEADING_SPACE:
        assert pair.llama_ids(text) == pair.hf_ids(" " + text)
    assert pair.llama_ids(PROMPT_AFTER_SPECIAL) != pair.hf_ids(PROMPT_AFTER_SPECIAL)
    assert pair.llama_ids(PROMPT_AFTER_SPECIAL) == pair.hf_ids(
        PROMPT_AFTER_SPECIAL.replace("<s>[", "<s> [")
    )


def test_the_tokenizer_json_prefix_of_a_sentencepiece_tokenizer_has_no_gaps(
    tokenizer_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """``tokenizer.json`` run as it is (``Prepend("▁")`` normalizer): a ``▁`` before every
    piece of text, as SentencePiece and llama.cpp put it."""
    legacy = variant(
        tokenizer_dirs["llama-spm"], tmp_path / "tok", tokenizer_class="PreTrainedTokenizerFast"
    )

    pair = Both(legacy, write_vocab_gguf(legacy, tmp_path / "legacy.gguf"))

    assert pair.differing([*SAMPLES, *LEADING_SPACE, PROMPT_AFTER_SPECIAL]) == []
    assert pair.llm.metadata["tokenizer.ggml.add_space_prefix"] == "true"


def test_whitespace_a_special_token_strips_stays_in_llama_cpp(
    tokenizer_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The documented gap of Phi-3-like ``rstrip`` special tokens: Hugging Face drops the
    whitespace after ``<end_of_turn>``, llama.cpp keeps it."""
    config = json.loads((tokenizer_dirs["gemma"] / "tokenizer_config.json").read_text("utf-8"))
    added = {
        i: {**t, "rstrip": t["content"] == "<end_of_turn>"}
        for i, t in config["added_tokens_decoder"].items()
    }
    stripping = variant(tokenizer_dirs["gemma"], tmp_path / "tok", added_tokens_decoder=added)
    prompt = SPECIAL["gemma"]

    pair = Both(stripping, write_vocab_gguf(stripping, tmp_path / "rstrip.gguf"))

    assert pair.llama_ids(prompt) != pair.hf_ids(prompt)
    assert pair.llama_ids(prompt.replace("<end_of_turn>\n", "<end_of_turn>")) == pair.hf_ids(prompt)


def test_the_pipeline_transformers_runs_is_written_not_the_files(
    tokenizer_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """SmolLM2 names ``GPT2Tokenizer``, which transformers 5 builds with the GPT-2
    pre-tokenizer alone, dropping ``tokenizer.json``'s digit split: the GGUF follows the
    tokenizer the model is trained with."""
    smollm = variant(tokenizer_dirs["smollm"], tmp_path / "tok", tokenizer_class="GPT2Tokenizer")

    pair = Both(smollm, write_vocab_gguf(smollm, tmp_path / "smollm.gguf"))

    assert pair.differing([*SAMPLES, *LEADING_SPACE, SPECIAL["smollm"]]) == []
    assert pair.llm.metadata["tokenizer.ggml.pre"] == "gpt-2"


#: Tokenizations differ between a right and a wrong vocabulary only on text rich enough
#: to need the merges in question: the play, not the synthetic fallback corpus.
needs_play = pytest.mark.skipif(
    not SHAKESPEARE.is_file(),
    reason="../shared/data/tinyshakespeare.txt absent: the synthetic fallback corpus is too "
    "small for the wrong vocabulary to tokenize differently",
)


@needs_play
def test_a_wrong_pre_tokenizer_name_tokenizes_differently(
    tokenizer_dirs: dict[str, Path],
    texts: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check has teeth: Llama-3's tokenizer written with the GPT-2 pre-tokenizer."""
    kind = gguf_vocab.tokenizer_kind
    monkeypatch.setattr(
        gguf_vocab,
        "tokenizer_kind",
        lambda spec, model_dir: (
            gguf_vocab.TokenizerKind("gpt2", "gpt-2")
            if kind(spec, model_dir).pre == "llama-bpe"
            else kind(spec, model_dir)
        ),
    )
    path = tokenizer_dirs["llama3"]

    wrong = Both(path, write_vocab_gguf(path, tmp_path / "wrong.gguf"))

    assert wrong.differing(SAMPLES + texts[:40])


@needs_play
def test_sentencepiece_scores_decide_the_merges(
    tokenizer_dirs: dict[str, Path],
    texts: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scores all equal (as ``gguf.LlamaHfVocab`` writes them, -1000): llama.cpp merges
    left to right instead of in the order of the merges, and tokenizes differently."""
    table = gguf_vocab._token_table

    def flat(*args: Any) -> tuple[list[str], list[float], list[int]]:
        tokens, scores, types = table(*args)
        return tokens, [-1000.0] * len(scores), types

    monkeypatch.setattr(gguf_vocab, "_token_table", flat)
    path = tokenizer_dirs["gemma"]

    wrong = Both(path, write_vocab_gguf(path, tmp_path / "flat.gguf"))

    assert wrong.differing(SAMPLES + texts[:40])


def _saved(core: Any, out_dir: Path) -> Path:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(str(out_dir))
    return out_dir


def _one_line_refusal(model_dir: Path) -> str:
    with pytest.raises(ModelError) as err:
        gguf_vocab.check_tokenizer(model_dir)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"GGUF export supports {gguf_vocab.SUPPORTED}; ")
    return message


def test_a_wordpiece_tokenizer_is_refused_in_one_line(tmp_path: Path, texts: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    core = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(texts[:200], trainers.WordPieceTrainer(vocab_size=300))

    assert "is a WordPiece model" in _one_line_refusal(_saved(core, tmp_path))


def test_an_unknown_byte_level_pre_tokenizer_is_refused_in_one_line(
    tmp_path: Path, texts: list[str]
) -> None:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{L}+|\s+|."), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.train_from_iterator(texts[:200], trainers.BpeTrainer(vocab_size=300))

    message = _one_line_refusal(_saved(core, tmp_path))

    assert "a byte-level BPE with pre-tokenizer" in message and r"\\p{L}+|\\s+|." in message


def test_a_non_special_added_token_that_strips_whitespace_is_refused_in_one_line(
    tokenizer_dirs: dict[str, Path], tmp_path: Path
) -> None:
    config = json.loads((tokenizer_dirs["gemma"] / "tokenizer_config.json").read_text("utf-8"))
    added = {
        i: {**t, "lstrip": t["content"] == "<table>"}
        for i, t in config["added_tokens_decoder"].items()
    }
    stripping = variant(tokenizer_dirs["gemma"], tmp_path / "tok", added_tokens_decoder=added)

    message = _one_line_refusal(stripping)

    assert "the added token '<table>' matched with lstrip, rstrip or single_word" in message


def test_a_missing_tokenizer_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"the fast tokenizer's .*tokenizer\.json: none there"):
        gguf_vocab.check_tokenizer(tmp_path)


def test_token_ids_beyond_the_models_vocab_size_are_refused(
    tokenizer_dirs: dict[str, Path], tmp_path: Path
) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "small.gguf"), "llama")
    # the highest id the trained tokenizer has (its size depends on the corpus it saw)
    top = max(hf_tokenizer(tokenizer_dirs["llama3"]).get_vocab().values())
    small = top - 100

    with pytest.raises(
        ModelError, match=f"has token ids up to {top}, beyond the model's vocab_size {small}"
    ):
        gguf_vocab.add_tokenizer(writer, tokenizer_dirs["llama3"], small)
