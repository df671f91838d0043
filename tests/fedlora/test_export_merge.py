"""Merging the adapter into the base: exact in fp32, and refusals with useful messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fedlora.errors import ExportError, ModelError
from fedlora.export.merge import load_fp32_model, load_peft_model, merge_adapter
from tests.fedlora.test_export_support import (
    llama_config,
    save_adapter,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_setup,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return tiny_setup(tmp_path_factory)


def _logits(model, tiny) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tiny.input_ids, attention_mask=tiny.attention_mask).logits


def test_merged_model_computes_the_same_logits_as_base_plus_adapter(tiny, tmp_path: Path) -> None:
    peft_logits = _logits(load_peft_model(tiny.base, tiny.adapter), tiny)
    base_logits = _logits(load_fp32_model(tiny.base), tiny)

    out = merge_adapter(tiny.base, tiny.adapter, tmp_path / "merged")
    merged = load_fp32_model(out)

    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(_logits(merged, tiny), peft_logits, atol=1e-5, rtol=0)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert next(merged.parameters()).dtype == torch.float32


def test_merged_dir_holds_safetensors_and_the_base_tokenizer(tiny, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = merge_adapter(tiny.base, tiny.adapter, tmp_path / "merged")

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    base_tok = AutoTokenizer.from_pretrained(str(tiny.base))
    merged_tok = AutoTokenizer.from_pretrained(str(out))
    assert merged_tok("w1 w2 w3")["input_ids"] == base_tok("w1 w2 w3")["input_ids"]


def test_missing_adapter_dir_is_an_export_error(tiny, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"no adapter in .*nowhere.*run federated training"):
        merge_adapter(tiny.base, tmp_path / "nowhere", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_adapter_without_safetensors_weights_is_refused(tiny, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(tiny.adapter / "adapter_config.json", adapter)

    with pytest.raises(ExportError, match=r"no adapter_model\.safetensors"):
        merge_adapter(tiny.base, adapter, tmp_path / "merged")


def test_adapter_for_a_different_base_shape_is_a_model_error(tiny, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    other = save_adapter(LlamaForCausalLM(llama_config(hidden=32)), tmp_path / "a32", seed=3)

    with pytest.raises(ModelError, match=r"adapter in .*a32 does not match base model .*size"):
        merge_adapter(tiny.base, other, tmp_path / "merged")


def test_adapter_for_a_deeper_base_is_refused_not_half_applied(tiny, tmp_path: Path) -> None:
    # Same widths, one more layer: peft would only warn and skip layer 2's tensors.
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    other = save_adapter(LlamaForCausalLM(llama_config(layers=3)), tmp_path / "deep", seed=3)

    with pytest.raises(ModelError, match=r"does not match base model .*unexpected.*layers\.2"):
        merge_adapter(tiny.base, other, tmp_path / "merged")


def test_missing_base_model_is_a_model_error(tiny, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no model at .*nobase"):
        merge_adapter(tmp_path / "nobase", tiny.adapter, tmp_path / "merged")
