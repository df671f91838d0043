"""GGUF export of every supported family: exact in F32, Q8_0 gated, every recipe step needed.

Each family is a tiny trained checkpoint (:mod:`fedlora.testing.checkpoints`) with a
LoRA adapter merged into it. The conversion check is fedlora's own
(:func:`fedlora.export.reference.check_conversion`): F32 GGUF in llama.cpp with an
F32 KV cache against the merged transformers model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from fedlora.errors import ExportError, ModelError
from fedlora.export import export_run, gguf_arch
from fedlora.export.gguf import CONVERSION, check_exportable, describe_gguf
from fedlora.export.merge import load_fp32_model, merge_adapter
from fedlora.export.reference import check_conversion
from fedlora.testing import checkpoints
from tests.fedlora.test_export_support import single_thread  # noqa: F401  (autouse fixture)

FAMILIES = tuple(checkpoints.FAMILIES)
UNTIED = {"llama3", "mistral", "phi3"}


@dataclass(frozen=True)
class Built:
    family: str
    base: Path
    adapter: Path
    merged: Path
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


_BUILT: dict[str, Built] = {}


def built(family: str, factory: pytest.TempPathFactory) -> Built:
    """A tiny trained ``family`` checkpoint, an adapter and their merge, once per session.

    Directories are named ``base`` / ``merged``, not after the family: llama.cpp gives models
    whose name says "phi3" Phi-3's special-token attributes, which need Phi-3's tokenizer.
    """
    if family not in _BUILT:
        root = factory.mktemp(f"family-{family}")
        base = checkpoints.tiny_checkpoint(family, root / "base")
        adapter = checkpoints.lora_adapter(base, root / "adapter")
        merged = merge_adapter(base, adapter, root / "merged")
        ids, mask = checkpoints.heldout()
        _BUILT[family] = Built(family, base, adapter, merged, ids, mask)
    return _BUILT[family]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    return built(request.param, tmp_path_factory)


def _check(tiny: Built, scratch: Path) -> dict[str, Any]:
    merged = load_fp32_model(tiny.merged)
    checked = check_conversion(
        CONVERSION, tiny.merged, merged, tiny.input_ids, tiny.attention_mask, scratch
    )
    return checked.record


def test_held_out_sentences_are_longer_than_the_sliding_window() -> None:
    _, mask = checkpoints.heldout()

    assert int(mask.sum(dim=1).max()) > 2 * checkpoints.SLIDING_WINDOW
    assert int(mask.sum()) > 300  # enough tokens for a 0.99 agreement to mean something


def test_the_tiny_model_is_confident(family: Built) -> None:
    """Peaked next-token distributions, so KL and top-1 measure the conversion, not noise."""
    model = load_fp32_model(family.base)

    with torch.no_grad():
        logits = model(input_ids=family.input_ids, attention_mask=family.attention_mask).logits
    top2 = logits.topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1])[family.attention_mask.bool()]

    assert margin.median() > 1.0


def test_f32_conversion_passes_the_conversion_check(family: Built, tmp_path: Path) -> None:
    record = _check(family, tmp_path)

    assert record["kl"] < 1e-7
    assert record["top1_agreement"] == 1.0
    assert record["tokenization"]["identical"] == record["tokenization"]["texts"] > 0


def test_q8_0_export_passes_its_gate(family: Built, tmp_path: Path) -> None:
    manifest = export_run(
        family.base,
        family.adapter,
        tmp_path / "export",
        family.input_ids,
        family.attention_mask,
        formats=("gguf-q8_0",),
    )

    q8 = next(a for a in manifest["artefacts"] if a["name"] == "gguf-q8_0")
    gate = q8["gate"]
    assert gate["kind"] == "reference" and gate["reference"]["identical_to_artefact"]
    assert q8["quality"]["kl"] <= gate["max_kl"]
    assert q8["quality"]["top1_agreement"] >= gate["min_top1_agreement"]
    assert gate["conversion"]["kl"] < 1e-7
    tensors = describe_gguf(tmp_path / "export" / q8["path"])["tensors"]
    assert ("output.weight" in tensors) is (family.family in UNTIED)


@pytest.mark.parametrize(("family_name", "tie"), [("qwen2", False), ("phi3", True)])
def test_the_other_embedding_tying_converts_exactly_too(
    family_name: str, tie: bool, tmp_path: Path
) -> None:
    """Qwen2.5-7B is untied, Qwen2.5-0.5B tied; a tied Phi-3 leaves llama.cpp no output.weight."""
    base = checkpoints.tiny_checkpoint(family_name, tmp_path / "model", tie=tie, steps=20)
    ids, mask = checkpoints.heldout()

    record = _check(Built(family_name, base, base, base, ids, mask), tmp_path / "scratch")

    assert record["kl"] < 1e-7 and record["top1_agreement"] == 1.0
    tensors = describe_gguf(tmp_path / "scratch")["tensors"]
    assert ("output.weight" in tensors) is not tie


# ------------------------------------------------------------------ each step has teeth


def _without(family: str, **changes: Any) -> Callable[[pytest.MonkeyPatch], None]:
    def sabotage(monkeypatch: pytest.MonkeyPatch) -> None:
        spec = gguf_arch.SPECS[family]
        monkeypatch.setitem(gguf_arch.SPECS, family, replace(spec, **changes))

    return sabotage


def _gemma2_without_softcaps(writer: Any, cfg: Any) -> None:
    writer.add_sliding_window(cfg.sliding_window)  # llama.cpp then caps at 50 and 30
    writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])


def _gemma3_without_the_layer_pattern(writer: Any, cfg: Any) -> None:
    writer.add_sliding_window(cfg.sliding_window)  # llama.cpp then assumes 5 sliding : 1 global


SABOTAGE = {
    # q/k left in rotate-half order for llama.cpp's interleaved RoPE
    ("llama", "no q/k permutation"): _without("llama", interleaved_rope=False),
    ("mistral", "no q/k permutation"): _without("llama", interleaved_rope=False),
    # Llama-3 frequencies without their llama3 scaling
    ("llama3", "no rope_freqs"): _without("llama", extra_tensors=gguf_arch.no_extra_tensors),
    # Qwen2's graph rotates halves: permuting as for llama is wrong
    ("qwen2", "q/k permuted"): _without("qwen2", interleaved_rope=True),
    # Gemma's x·(1+w) norms written as w
    ("gemma2", "no norm+1"): _without("gemma2", norm_offset=0.0),
    ("gemma3", "no norm+1"): _without("gemma3", norm_offset=0.0),
    ("gemma2", "no soft-caps"): _without("gemma2", hparams=_gemma2_without_softcaps),
    ("gemma3", "no sliding-window pattern"): _without(
        "gemma3", hparams=_gemma3_without_the_layer_pattern
    ),
}


@pytest.mark.parametrize(("name", "step"), list(SABOTAGE), ids=[" / ".join(k) for k in SABOTAGE])
def test_a_conversion_missing_a_step_fails_the_check(
    name: str,
    step: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tiny = built(name, tmp_path_factory)
    SABOTAGE[name, step](monkeypatch)

    with pytest.raises(ExportError, match=r"gguf-f32 conversion of the merged model") as err:
        _check(tiny, tmp_path)

    kl = float(str(err.value).split("(KL ")[1].split(" ")[0])
    assert kl > 1e-3, step  # far beyond the check's 1e-5: the step matters on this model


# ------------------------------------------------------------------ refusals


def _config_dir(tmp_path: Path, family: str, **changes: Any) -> Path:
    """A checkpoint directory of ``family`` with config changes, no weights: what the
    pre-training check reads."""
    config = checkpoints.tiny_config(family, checkpoints.load_tokenizer(None))
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    model = tmp_path / "model"
    config.save_pretrained(str(model))
    checkpoints.save_tokenizer(None, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))
    return model


@pytest.mark.parametrize("family_name", FAMILIES)
def test_every_supported_family_passes_the_preflight(family_name: str, tmp_path: Path) -> None:
    check_exportable(_config_dir(tmp_path, family_name))


LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "long_factor": [1.0] * 8,
    "short_factor": [1.0] * 8,
    "original_max_position_embeddings": 64,
}

REFUSED = [
    ("llama", {"architectures": ["GPTNeoXForCausalLM"]}, "GGUF export supports LlamaForCausalLM"),
    ("llama", {"mlp_bias": True}, "MLP biases"),
    ("llama", {"hidden_act": "gelu"}, "activation 'gelu'"),
    ("mistral", {"sliding_window": 8}, "sliding-window attention .8 of 128 positions"),
    (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0},
        "sliding-window",
    ),
    (
        "qwen2",
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
        "RoPE type 'yarn'",
    ),
    ("gemma2", {"query_pre_attn_scalar": 64}, "query_pre_attn_scalar 64"),
    ("gemma2", {"tie_word_embeddings": False}, "untied embeddings"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attention logit soft-capping"),
    ("phi3", {"rope_parameters": LONGROPE}, "RoPE type 'longrope'"),
]


@pytest.mark.parametrize(
    ("family_name", "changes", "said"), REFUSED, ids=[f"{f}-{s[:24]}" for f, _, s in REFUSED]
)
def test_an_option_llama_cpp_runs_differently_is_refused_in_one_line(
    family_name: str, changes: dict[str, Any], said: str, tmp_path: Path
) -> None:
    model = _config_dir(tmp_path, family_name, **changes)

    with pytest.raises(ModelError, match=said) as err:
        check_exportable(model)

    message = str(err.value)
    assert "\n" not in message
    assert "safetensors (int8)" in message  # and says what to do instead


def test_the_unsupported_architecture_message_names_every_supported_one(tmp_path: Path) -> None:
    model = _config_dir(tmp_path, "llama", architectures=["GPTNeoXForCausalLM"])

    with pytest.raises(ModelError) as err:
        check_exportable(model)

    for arch in gguf_arch.supported_architectures():
        assert arch in str(err.value)
    assert len(gguf_arch.supported_architectures()) == 6
