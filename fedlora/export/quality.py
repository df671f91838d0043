"""How far an exported model's predictions moved from a reference, and the gate on it.

Measured on held-out token sequences (``input_ids`` + ``attention_mask``, any
padding side):

* ``kl`` — mean over non-pad positions of KL(reference ‖ candidate) between the
  next-token distributions, in nats;
* ``top1_agreement`` — share of those positions where both pick the same token;
* ``perplexity`` / ``reference_perplexity`` — exp of the mean next-token NLL of
  each model on the sequences themselves (position *t* predicts token *t+1*,
  counted where both are non-pad).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from fedlora.errors import ConfigError, ExportError, ModelError


@dataclass(frozen=True)
class QualityGate:
    """The least an artefact must keep of the reference's predictions to be exported.

    ``max_perplexity_increase``: the candidate's held-out perplexity may exceed the
    reference's by at most this fraction (0.01 = 1 %); ``inf`` (the default) does not
    check it. KL and top-1 see every near-tie the candidate breaks the other way;
    perplexity says whether the text got less likely, which is what a user notices.
    """

    max_kl: float
    min_top1_agreement: float
    max_perplexity_increase: float = math.inf

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_kl) and self.max_kl >= 0):
            raise ConfigError(f"gate max_kl must be a finite number >= 0, got {self.max_kl!r}")
        if not 0.0 <= self.min_top1_agreement <= 1.0:
            raise ConfigError(
                f"gate min_top1_agreement must be in [0, 1], got {self.min_top1_agreement!r}"
            )
        if not self.max_perplexity_increase >= 0:  # inf allowed; NaN refused
            raise ConfigError(
                "gate max_perplexity_increase must be a number >= 0, "
                f"got {self.max_perplexity_increase!r}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: QualityGate) -> QualityGate:
        """``base`` with the keys of ``values`` overridden; unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown gate key(s) {unknown}: use {sorted(known)}")
        merged = {name: getattr(base, name) for name in known} | dict(values)
        try:
            return cls(**{k: float(v) for k, v in merged.items()})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"gate values must be numbers, got {dict(values)!r}") from err

    def failures(self, quality: Mapping[str, float]) -> list[str]:
        """Human-readable reasons ``quality`` fails this gate; empty if it passes."""
        reasons = []
        if not quality["kl"] <= self.max_kl:  # also catches NaN
            reasons.append(f"KL {quality['kl']:.3g} > {self.max_kl:.3g}")
        if not quality["top1_agreement"] >= self.min_top1_agreement:
            reasons.append(
                f"top-1 agreement {quality['top1_agreement']:.4f} < {self.min_top1_agreement:.4f}"
            )
        if math.isfinite(self.max_perplexity_increase):
            increase = quality["perplexity"] / quality["reference_perplexity"] - 1.0
            if not increase <= self.max_perplexity_increase:
                reasons.append(
                    f"perplexity {quality['perplexity']:.4g} is {increase:+.2%} of the "
                    f"reference's {quality['reference_perplexity']:.4g} "
                    f"(at most {self.max_perplexity_increase:+.2%})"
                )
        return reasons

    def as_dict(self) -> dict[str, float]:
        gate = {"max_kl": self.max_kl, "min_top1_agreement": self.min_top1_agreement}
        if math.isfinite(self.max_perplexity_increase):  # JSON has no infinity
            gate["max_perplexity_increase"] = self.max_perplexity_increase
        return gate


def check_heldout(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab: int | None = None
) -> None:
    """Refuse held-out tensors that cannot be scored (shape, dtype, no targets, bad ids)."""
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ExportError(
            "held-out input_ids and attention_mask must both be [batch, seq] of the same shape, "
            f"got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    if input_ids.dtype.is_floating_point:
        raise ExportError(
            "held-out input_ids must be integer token ids: tokenize the held-out text"
        )
    real = attention_mask != 0
    if not bool((real[:, :-1] & real[:, 1:]).any()):
        raise ExportError(
            "held-out set has no next-token targets: pass sequences of at least two tokens"
        )
    used = input_ids[real]
    if vocab is not None and (int(used.min()) < 0 or int(used.max()) >= vocab):
        raise ExportError(
            f"held-out token ids must be in [0, {vocab}): tokenize with the base model's tokenizer"
        )


def _logits(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits.to(torch.float64)


@torch.no_grad()
def compare_logits(
    reference_model: Any,
    candidate_model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Compare two causal LMs' next-token predictions on held-out sequences.

    Returns ``kl``, ``top1_agreement``, ``perplexity`` (candidate),
    ``reference_perplexity``, and the counts ``tokens`` (positions compared) and
    ``targets`` (next-token targets scored). Both models run in eval mode under
    ``no_grad``; their previous train/eval mode is restored afterwards.
    """
    vocab = reference_model.config.vocab_size
    if candidate_model.config.vocab_size != vocab:
        raise ModelError(
            f"cannot compare models with different vocabularies ({vocab} vs "
            f"{candidate_model.config.vocab_size}): export from the same base"
        )
    check_heldout(input_ids, attention_mask, vocab)
    modes = (reference_model.training, candidate_model.training)
    reference_model.eval()
    candidate_model.eval()
    kl_sum = agree = tokens = targets = 0.0
    nll_ref = nll_cand = 0.0
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].long()
            mask = attention_mask[start : start + batch_size].long()
            ref = torch.log_softmax(_logits(reference_model, ids, mask), dim=-1)
            cand = torch.log_softmax(_logits(candidate_model, ids, mask), dim=-1)
            real = mask.bool()
            kl = (ref.exp() * (ref - cand)).sum(-1)
            kl_sum += float(kl[real].sum())
            agree += float((ref.argmax(-1) == cand.argmax(-1))[real].sum())
            tokens += float(real.sum())
            scored = real[:, :-1] & real[:, 1:]
            nxt = ids[:, 1:].unsqueeze(-1)
            nll_ref -= float(ref[:, :-1].gather(-1, nxt).squeeze(-1)[scored].sum())
            nll_cand -= float(cand[:, :-1].gather(-1, nxt).squeeze(-1)[scored].sum())
            targets += float(scored.sum())
    finally:
        reference_model.train(modes[0])
        candidate_model.train(modes[1])
    return {
        "kl": max(0.0, kl_sum / tokens),
        "top1_agreement": agree / tokens,
        "perplexity": math.exp(nll_cand / targets),
        "reference_perplexity": math.exp(nll_ref / targets),
        "tokens": int(tokens),
        "targets": int(targets),
    }
