"""compare_logits against hand-computed values, and the quality gate's rules."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fedlora.errors import ConfigError, ExportError, ModelError
from fedlora.export.merge import load_fp32_model
from fedlora.export.quality import QualityGate, compare_logits
from tests.fedlora.test_export_support import (
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_setup,
)


class FixedLogits(torch.nn.Module):
    """A stand-in causal LM that returns the same logits table for every batch row."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = logits
        self.config = SimpleNamespace(vocab_size=logits.shape[-1])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(
            logits=self.table[: input_ids.shape[1]].expand(input_ids.shape[0], -1, -1)
        )


def test_values_match_a_hand_computation_and_ignore_padding() -> None:
    ref_logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    cand_logits = ref_logits.clone()
    cand_logits[1] = torch.tensor([1.0, 0.0, 0.0])  # different top-1 at position 1
    cand_logits[2] = torch.tensor([9.0, 0.0, 0.0])  # position 2 is padding: must not count
    ids = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[1, 1, 0]])

    quality = compare_logits(FixedLogits(ref_logits), FixedLogits(cand_logits), ids, mask)

    p = torch.softmax(ref_logits[1].double(), -1)
    kl_pos1 = float((p * (p.log() - torch.log_softmax(cand_logits[1].double(), -1))).sum())
    nll = -float(torch.log_softmax(ref_logits[0].double(), -1)[1])  # the one target: 0 -> 1
    nll_cand = -float(torch.log_softmax(cand_logits[0].double(), -1)[1])
    assert quality["tokens"] == 2 and quality["targets"] == 1
    assert quality["kl"] == pytest.approx(kl_pos1 / 2)
    assert quality["top1_agreement"] == pytest.approx(0.5)
    assert quality["reference_perplexity"] == pytest.approx(math.exp(nll))
    assert quality["perplexity"] == pytest.approx(math.exp(nll_cand))


def test_a_model_against_itself_and_perplexity_against_the_hf_loss(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tiny = tiny_setup(tmp_path_factory)
    model = load_fp32_model(tiny.base)
    ids, mask = tiny.input_ids, tiny.attention_mask
    labels = ids.masked_fill(mask == 0, -100)

    quality = compare_logits(model, model, ids, mask, batch_size=5)  # batches of uneven size

    with torch.no_grad():
        hf_loss = float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    assert quality["kl"] == 0.0 and quality["top1_agreement"] == 1.0
    assert quality["tokens"] == int(mask.sum())
    assert quality["perplexity"] == quality["reference_perplexity"]
    assert quality["perplexity"] == pytest.approx(math.exp(hf_loss), rel=1e-4)


def test_models_are_left_in_the_mode_they_came_in(tmp_path_factory) -> None:
    tiny = tiny_setup(tmp_path_factory)
    model = load_fp32_model(tiny.base).train()

    compare_logits(model, model, tiny.input_ids[:2], tiny.attention_mask[:2])

    assert model.training


@pytest.mark.parametrize(
    ("ids", "mask", "message"),
    [
        (torch.tensor([1, 2, 3]), torch.tensor([1, 1, 1]), r"\[batch, seq\]"),
        (torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 1]]), "integer token ids"),
        (torch.tensor([[1, 2]]), torch.tensor([[1, 0]]), "no next-token targets"),
        (torch.tensor([[1, 7]]), torch.tensor([[1, 1]]), r"in \[0, 3\)"),
    ],
)
def test_unusable_heldout_tensors_are_refused(ids, mask, message) -> None:
    model = FixedLogits(torch.zeros(4, 3))

    with pytest.raises(ExportError, match=message):
        compare_logits(model, model, ids, mask)


def test_models_with_different_vocabularies_are_not_compared() -> None:
    with pytest.raises(ModelError, match="different vocabularies"):
        compare_logits(
            FixedLogits(torch.zeros(4, 3)),
            FixedLogits(torch.zeros(4, 5)),
            torch.tensor([[0, 1]]),
            torch.tensor([[1, 1]]),
        )


# ---------------------------------------------------------------- the gate

GATE = QualityGate(max_kl=1e-3, min_top1_agreement=0.98)


def test_gate_passes_inside_and_names_each_failure_with_numbers() -> None:
    assert GATE.failures({"kl": 1e-3, "top1_agreement": 0.98}) == []
    assert GATE.failures({"kl": 2.5e-3, "top1_agreement": 0.9712}) == [
        "KL 0.0025 > 0.001",
        "top-1 agreement 0.9712 < 0.9800",
    ]
    assert GATE.failures({"kl": math.nan, "top1_agreement": 1.0}) == ["KL nan > 0.001"]


def test_a_perplexity_gate_names_the_increase_and_is_absent_from_the_record_when_off() -> None:
    gate = QualityGate(max_kl=1.0, min_top1_agreement=0.0, max_perplexity_increase=0.01)
    ok = {"kl": 0.0, "top1_agreement": 1.0, "perplexity": 30.2, "reference_perplexity": 30.0}
    worse = {**ok, "perplexity": 30.6}

    assert gate.failures(ok) == []
    assert gate.failures(worse) == [
        "perplexity 30.6 is +2.00% of the reference's 30 (at most +1.00%)"
    ]
    assert GATE.failures(worse) == []  # not checked unless set
    assert gate.as_dict()["max_perplexity_increase"] == 0.01
    assert "max_perplexity_increase" not in GATE.as_dict()
    assert QualityGate.from_dict({"max_perplexity_increase": 0.05}, gate).max_kl == 1.0


def test_gate_overrides_keep_unset_defaults() -> None:
    assert QualityGate.from_dict({"max_kl": 0.5}, GATE) == QualityGate(0.5, 0.98)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kl": 0.1}, "unknown gate key"),
        ({"max_kl": -1}, "max_kl must be"),
        ({"min_top1_agreement": 1.5}, r"in \[0, 1\]"),
        ({"max_kl": "tight"}, "must be numbers"),
        ({"max_perplexity_increase": math.nan}, "max_perplexity_increase must be"),
    ],
)
def test_invalid_gates_are_config_errors(values, message) -> None:
    with pytest.raises(ConfigError, match=message):
        QualityGate.from_dict(values, GATE)
