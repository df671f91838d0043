"""GGUF artefacts run by llama.cpp: logits, tokenization, generation, K-quants, the gates."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedlora.errors import ExportError
from fedlora.export import (
    export_run,
    get_format,
    gguf,
    gguf_vocab,
    read_manifest,
    register_format,
    verify_export,
)
from fedlora.export.gguf import LlamaCppModel, describe_gguf, quantize_gguf, write_f32_gguf
from fedlora.export.merge import load_fp32_model
from fedlora.export.quality import compare_logits
from tests.fedlora.test_export_gguf_support import TinyGguf, tiny_gguf
from tests.fedlora.test_export_support import single_thread  # noqa: F401  (autouse fixture)

TEXTS = [
    "the river by the old bridge.",
    "café naïve façade — «quoted» déjà vu",
    "日本語のテキスト and 中文 mixed",
    "emoji 🙂👍🏽 and\ttabs\nnew lines   three spaces",
    "numbers 3.14159, 2026-11-28 and $100!",
    "",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyGguf:
    return tiny_gguf(tmp_path_factory)


@pytest.fixture(scope="module")
def f32_gguf(tiny: TinyGguf, tmp_path_factory: pytest.TempPathFactory) -> LlamaCppModel:
    out = write_f32_gguf(tiny.merged, tmp_path_factory.mktemp("f32") / "model-f32.gguf")
    # K and V in F32, as the conversion check runs it: with llama.cpp's default F16 cache,
    # 2 of 437 near-tied top-1 tokens flip on a CPU with AVX-512 (KL 2.8e-8).
    return LlamaCppModel(out, f32_cache=True)


def test_f32_gguf_logits_match_the_merged_model(tiny: TinyGguf, f32_gguf: LlamaCppModel) -> None:
    merged = load_fp32_model(tiny.merged)

    quality = compare_logits(merged, f32_gguf, tiny.input_ids, tiny.attention_mask)

    assert quality["kl"] < 1e-6
    assert quality["top1_agreement"] == 1.0
    assert quality["perplexity"] == pytest.approx(quality["reference_perplexity"], rel=1e-3)


def _unpermuted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make fedlora's conversion forget the q/k permutation (tests only, no production flag)."""
    monkeypatch.setattr(gguf, "permute_rotary", lambda weight, n_head: weight)


def test_gguf_without_the_qk_permutation_is_caught_by_the_conversion_gate(
    tiny: TinyGguf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The silent-failure trap: un-permuted q/k load and run in llama.cpp, but are wrong."""
    _unpermuted(monkeypatch)
    wrong = LlamaCppModel(write_f32_gguf(tiny.merged, tmp_path / "wrong.gguf"))
    merged = load_fp32_model(tiny.merged)

    quality = compare_logits(merged, wrong, tiny.input_ids, tiny.attention_mask)

    assert gguf.CONVERSION.gate.failures(quality)
    assert quality["kl"] > 1e-2
    # A fixed threshold loose enough for llama.cpp's loss on real models lets it through:
    # the exact check of the conversion is what stops it.
    assert not get_format("gguf-q4_k_m").default_gate.failures(quality)


def test_tokenization_agrees_with_hf_including_non_ascii(
    tiny: TinyGguf, f32_gguf: LlamaCppModel
) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny.merged), local_files_only=True)

    for text in TEXTS:
        assert f32_gguf.tokenize(text) == hf(text)["input_ids"], text


def test_greedy_generation_matches_hf(tiny: TinyGguf, f32_gguf: LlamaCppModel) -> None:
    merged = load_fp32_model(tiny.merged)
    prompt = [int(t) for t in tiny.input_ids[0, :5]]

    with torch.no_grad():
        hf = merged.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=2
        )[0, len(prompt) :].tolist()
    ours = f32_gguf.greedy(prompt, max_new_tokens=8)

    assert ours == hf[: len(ours)]
    assert len(ours) >= 1


def test_q8_0_and_q4_k_m_pass_their_gates_and_record_tensor_types(
    tiny: TinyGguf, tmp_path: Path
) -> None:
    manifest = export_run(
        tiny.base,
        tiny.adapter,
        tmp_path / "export",
        tiny.input_ids,
        tiny.attention_mask,
        formats=("gguf-q8_0", "gguf-q4_k_m"),
    )

    by_name = {a["name"]: a for a in manifest["artefacts"]}
    q8, q4 = by_name["gguf-q8_0"], by_name["gguf-q4_k_m"]
    assert (q8["format"], q8["quantization"]) == ("gguf", "Q8_0")
    assert q8["details"]["tensor_types"] == {"F32": 5, "Q8_0": 16}  # norms stay F32
    assert q4["details"]["k_quant_tensors"] == 16  # 256-wide rows: real K-quants
    assert "note" not in q4["details"]
    assert set(q4["details"]["tensor_types"]) == {"F32", "Q4_K", "Q6_K"}
    assert q4["total_bytes"] < q8["total_bytes"] < by_name["merged-fp32"]["total_bytes"]
    for artefact in (q8, q4):
        quality, gate = artefact["quality"], artefact["gate"]
        # Gated against llama.cpp's own quantization of the checked conversion: fedlora's
        # writer made the very same file, so the reference is the artefact's own figures.
        assert gate["kind"] == "reference" and gate["reference"]["identical_to_artefact"]
        assert gate["reference"]["kl"] == quality["kl"]
        assert gate["max_kl"] == pytest.approx(quality["kl"] * 1.5 + 1e-4)
        assert gate["min_top1_agreement"] == pytest.approx(quality["top1_agreement"] - 0.01)
        conversion = gate["conversion"]  # the F32 file both were quantized from, exact
        assert conversion["kl"] < 1e-9 and conversion["top1_agreement"] == 1.0
        assert conversion["tokenization"] == {"texts": 16, "identical": 16}
    assert q8["quality"]["kl"] < q4["quality"]["kl"] < 1e-2
    assert verify_export(tmp_path / "export") == read_manifest(tmp_path / "export")


def test_an_unpermuted_conversion_fails_the_gate_and_exports_nothing(
    tiny: TinyGguf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _unpermuted(monkeypatch)

    with pytest.raises(ExportError, match=r"gguf-f32 conversion of the merged model .*KL 0\.\d+ >"):
        export_run(
            tiny.base,
            tiny.adapter,
            tmp_path / "export",
            tiny.input_ids,
            tiny.attention_mask,
            formats=("gguf-q4_k_m",),
        )
    assert list(tmp_path.iterdir()) == []


def test_a_vocabulary_bug_is_caught_though_the_logits_are_right(
    tiny: TinyGguf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half the BPE merges lost: same tensors, same logits per id, other tokens on a device."""
    add_tokenizer = gguf_vocab.add_tokenizer

    class HalfTheMerges:
        def __init__(self, writer: object) -> None:
            self.writer = writer

        def __getattr__(self, name: str) -> object:
            return getattr(self.writer, name)

        def add_token_merges(self, merges: list[str]) -> None:
            self.writer.add_token_merges(merges[: len(merges) // 2])  # type: ignore[attr-defined]

    def lossy(writer: object, model_dir: Path, vocab_size: int) -> None:
        add_tokenizer(HalfTheMerges(writer), model_dir, vocab_size)

    monkeypatch.setattr(gguf_vocab, "add_tokenizer", lossy)

    with pytest.raises(ExportError, match=r"of 16 held-out texts tokenize differently"):
        export_run(
            tiny.base,
            tiny.adapter,
            tmp_path / "export",
            tiny.input_ids,
            tiny.attention_mask,
            formats=("gguf-q8_0",),
        )
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def writer_without_permutation(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """gguf-q4_k_m's artefact writer made to skip the q/k permutation; the conversion the
    gate checks, and the reference quantized from it, stay right."""
    honest = get_format("gguf-q4_k_m")

    def broken_write(merged_dir: Path, out_dir: Path) -> Path:
        with monkeypatch.context() as patch:
            _unpermuted(patch)
            return honest.write(merged_dir, out_dir)

    register_format(replace(honest, write=broken_write), replace=True)
    yield
    register_format(honest, replace=True)


def test_the_reference_catches_an_artefact_that_is_not_what_llama_cpp_makes(
    tiny: TinyGguf, tmp_path: Path, writer_without_permutation: None
) -> None:
    with pytest.raises(ExportError) as err:
        export_run(
            tiny.base,
            tiny.adapter,
            tmp_path / "export",
            tiny.input_ids,
            tiny.attention_mask,
            formats=("gguf-q4_k_m",),
        )

    message = str(err.value)
    assert "gguf-q4_k_m artefact failed its quality gate" in message
    assert "llama.cpp's own quantization of the checked conversion gives KL" in message
    kl = float(message.split("(KL ")[1].split(" ")[0])
    backstop = get_format("gguf-q4_k_m").default_gate
    assert 1e-2 < kl < backstop.max_kl  # a fixed loose threshold would have shipped it
    assert list(tmp_path.iterdir()) == []


def test_k_quants_fall_back_on_128_wide_rows(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Shaped like the embedded default (hidden 128, FFN 344): llama.cpp cannot K-quantize it."""
    small = tiny_gguf(tmp_path_factory, hidden=128, intermediate=344)
    f32 = write_f32_gguf(small.merged, tmp_path / "model-f32.gguf")
    capfd.readouterr()

    quantize_gguf(f32, tmp_path / "q4" / "model-q4_k_m.gguf", "q4_k_m")

    # llama.cpp's warning per fallen-back tensor stays off the user's terminal; the manifest
    # has the same facts
    assert "falling back" not in capfd.readouterr().err

    details = describe_gguf(tmp_path / "q4")
    assert details["file_type"] == "Q4_K_M"
    assert details["k_quant_tensors"] == 0
    # Q4_K → Q5_0, Q6_K (output, one attn_v) → Q8_0 on 128-wide rows; 344 fits no block: F16.
    assert details["tensor_types"] == {"F16": 2, "F32": 5, "Q5_0": 12, "Q8_0": 2}
    assert "not a K-quant model" in details["note"]


def test_a_failed_gate_reports_the_numbers_and_writes_nothing(
    tiny: TinyGguf, tmp_path: Path
) -> None:
    export = tmp_path / "export"

    with pytest.raises(ExportError, match=r"gguf-q4_k_m artefact failed .*KL .* > 1e-09"):
        export_run(
            tiny.base,
            tiny.adapter,
            export,
            tiny.input_ids,
            tiny.attention_mask,
            formats=("gguf-q4_k_m",),
            gate={"gguf-q4_k_m": {"max_kl": 1e-9}},
        )
    assert not export.exists()
    assert list(tmp_path.iterdir()) == []


def test_unknown_gguf_quantization_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown GGUF quantization 'q3_x'"):
        quantize_gguf(tmp_path / "in.gguf", tmp_path / "out.gguf", "q3_x")
    assert list(tmp_path.iterdir()) == []
