"""Gates of quantized artefacts: the conversion checked exactly, the quantization by reference.

A quantized GGUF differs from the merged fp32 model for two reasons, and only one
of them is fedlora's:

* **The conversion** (HF checkpoint → GGUF: q/k rows permuted to ggml's rotary
  layout, tensor names, hyperparameters, vocabulary, token types, special ids,
  BOS). This is fedlora's code, and in F32 it is lossless: nothing but float
  rounding separates a right conversion from the merged model, and a wrong one
  (q/k not permuted: KL ≈ 0.3 on the tiny test model) is far off.
* **llama.cpp's quantization** and its quantized CPU kernels, which also
  quantize activations (Q8_0 dot products run on 8-bit activation blocks). Its
  loss depends on the model, not on fedlora: Q8_0 costs KL 1.6e-4 on the
  embedded 0.5 M-parameter model and 8.9e-3 (top-1 0.948) on SmolLM2-135M,
  where an F16 GGUF of the same run is at 1.9e-5. A fixed threshold against the
  merged model, set on a toy, either refuses a correct export of a real model
  or is too loose to notice a bug on a small one.

So a quantized GGUF is gated in two parts, both measured in the same run on the
same held-out tokens:

1. **Conversion check** (:func:`check_conversion`). The F32 GGUF that fedlora
   writes from the merged model is run in llama.cpp with F32 weights *and* an
   F32 KV cache, so no llama.cpp loss is left, and must match the merged model
   tightly (KL ≤ 1e-5, top-1 ≥ 0.99) and tokenize every held-out text exactly as
   the model's own tokenizer does. This is what proves fedlora's conversion
   right: a layout bug moves the logits, a vocabulary bug changes the tokens.
2. **Quantization against a reference** (:func:`reference_gate`). The
   reference is llama.cpp's own quantization, with its default parameters for
   the type, *of the conversion that passed the check*: its KL and top-1
   against the merged model are what llama.cpp's quantization of this model
   costs, the loss no exporter avoids. The artefact must be within
   :class:`ReferenceMargin` of it.

Comparing an artefact with a reference quantized from the artefact's *own*
conversion would catch nothing — a conversion bug would be in both — which is
why the conversion is checked on its own, in F32, where the expected loss is
zero. The reference, in turn, is produced apart from the artefact writer, from
the checked file through the bare quantizer call, so that whatever the writer
does differently (quantizes another or an unchecked file, another type, other
llama.cpp parameters, goes through F16) shows up against it. Today fedlora's
GGUF writer does exactly what the reference does, so the two files are
byte-identical, the reference is measured once, and the manifest says so
(``identical_to_artefact``); the gate then says: a checked conversion, quantized
the way llama.cpp quantizes, losing what llama.cpp loses.

F16 and F32 artefacts have no quantization loss to excuse and keep absolute
gates against the merged model. A reference-gated format's own
``default_gate`` is a **backstop**: a bound no release may pass even if
llama.cpp's own quantization does (a llama.cpp regression), loose enough for
the smallest real models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlora.errors import ConfigError, ExportError
from fedlora.export.manifest import sha256_file
from fedlora.export.quality import QualityGate, compare_logits

FIGURES = ("kl", "top1_agreement", "perplexity", "tokens")


@dataclass(frozen=True)
class ReferenceMargin:
    """How far an artefact may fall behind its reference (same type, same tokens).

    ``kl ≤ reference_kl × kl_factor + kl_slack`` and
    ``top1 ≥ reference_top1 − top1_slack``. Two equally good quantizations of one
    type differ by rounding choices (an F16 intermediate, another type for one
    tensor), well inside 1.5× the reference's KL; the mistakes this is for — another
    type (Q8_0 → Q4: KL ×10 or more), an unchecked or stale source file, a broken
    layout (KL ≈ 0.3) — are far outside. ``kl_slack`` keeps a near-lossless
    reference (KL 1e-5) from making rounding noise fatal; ``top1_slack`` is about
    two standard errors of an agreement near 0.95 on 2,000 tokens.
    """

    kl_factor: float = 1.5
    kl_slack: float = 1e-4
    top1_slack: float = 0.01

    def __post_init__(self) -> None:
        if not (math.isfinite(self.kl_factor) and self.kl_factor >= 1.0):
            raise ConfigError(f"reference margin kl_factor must be ≥ 1, got {self.kl_factor!r}")
        if not (math.isfinite(self.kl_slack) and self.kl_slack >= 0):
            raise ConfigError(f"reference margin kl_slack must be ≥ 0, got {self.kl_slack!r}")
        if not 0.0 <= self.top1_slack <= 1.0:
            raise ConfigError(
                f"reference margin top1_slack must be in [0, 1], got {self.top1_slack!r}"
            )

    def gate(self, reference: Mapping[str, Any], backstop: QualityGate) -> QualityGate:
        """The effective gate: within the margin of ``reference``, and never past ``backstop``."""
        return QualityGate(
            max_kl=min(backstop.max_kl, reference["kl"] * self.kl_factor + self.kl_slack),
            min_top1_agreement=min(
                1.0,
                max(backstop.min_top1_agreement, reference["top1_agreement"] - self.top1_slack),
            ),
            max_perplexity_increase=backstop.max_perplexity_increase,
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "kl_factor": self.kl_factor,
            "kl_slack": self.kl_slack,
            "top1_slack": self.top1_slack,
        }


DEFAULT_MARGIN = ReferenceMargin()


@dataclass(frozen=True)
class Conversion:
    """A lossless conversion of the merged checkpoint into a runtime's container.

    Checked once per export call and shared by every artefact of that container.
    """

    name: str
    """Recorded in the manifest (``gguf-f32``)."""
    file_name: str
    write: Callable[[Path, Path], Path]
    """``(merged_dir, out_file) -> out_file``."""
    load: Callable[[Path], Any]
    """``file -> model`` run without any loss of the runtime's own (F32 weights and cache)."""
    gate: QualityGate
    """Against the merged model: only float rounding may separate them."""
    runtime: str
    """How ``load`` runs it, for the manifest."""
    tokenization: Callable[[Path, Any, torch.Tensor, torch.Tensor], dict[str, Any]] | None = None
    """``(merged_dir, model, ids, mask) -> {"texts", "identical", "first_mismatch"?}``."""


@dataclass
class CheckedConversion:
    """A conversion file that passed its check, and the record the manifest keeps of it."""

    file: Path
    record: dict[str, Any]


def _contents(directory: Path) -> list[str]:
    """The sha256 of every file under ``directory``, sorted: what it holds, whatever the names."""
    return sorted(sha256_file(p) for p in directory.rglob("*") if p.is_file())


def _figures(quality: Mapping[str, Any]) -> dict[str, Any]:
    return {k: quality[k] for k in FIGURES if k in quality}


def check_conversion(
    conversion: Conversion,
    merged_dir: Path,
    merged_model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    scratch: Path,
) -> CheckedConversion:
    """Write ``conversion`` of the merged model into ``scratch`` and check it, or refuse."""
    file = conversion.write(merged_dir, scratch / conversion.file_name)
    model = conversion.load(file)
    try:
        quality = compare_logits(merged_model, model, ids, mask)
        tokens = (
            conversion.tokenization(merged_dir, model, ids, mask)
            if conversion.tokenization is not None
            else None
        )
    finally:
        del model
    reasons = conversion.gate.failures(quality)
    if tokens is not None and tokens["identical"] != tokens["texts"]:
        reasons.append(
            f"{tokens['texts'] - tokens['identical']} of {tokens['texts']} held-out texts "
            f"tokenize differently (first: {tokens.get('first_mismatch')!r})"
        )
    if reasons:
        raise ExportError(
            f"fedlora's {conversion.name} conversion of the merged model does not match it "
            f"({'; '.join(reasons)}; {quality['tokens']} held-out tokens, {conversion.runtime}): "
            "this is a conversion bug, not quantization loss; nothing was exported: "
            "ship the merged-fp32 or int8 artefact and report it"
        )
    record: dict[str, Any] = {
        "name": conversion.name,
        "sha256": sha256_file(file),
        "runtime": conversion.runtime,
        "gate": conversion.gate.as_dict(),
        **_figures(quality),
    }
    if tokens is not None:
        record["tokenization"] = tokens
    return CheckedConversion(file, record)


def reference_gate(
    name: str,
    make_reference: Callable[[Path, Path], Path],
    load: Callable[[Path], Any],
    artefact_dir: Path,
    artefact_quality: Mapping[str, Any],
    conversion: CheckedConversion,
    merged_model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    scratch: Path,
    margin: ReferenceMargin,
    backstop: QualityGate,
) -> tuple[QualityGate, dict[str, Any]]:
    """The effective gate of artefact ``name`` and the manifest's record of how it was set.

    ``make_reference(conversion_file, out_dir) -> out_dir`` quantizes the checked
    conversion the runtime's own way; ``load`` runs it as the artefact is run. When
    it holds the same bytes as ``artefact_dir`` it is not run again.
    """
    ref_dir = make_reference(conversion.file, scratch / f"reference-{name}")
    ref_sha = _contents(ref_dir)
    identical = ref_sha == _contents(artefact_dir)
    if identical:
        quality: Mapping[str, Any] = artefact_quality
    else:
        model = load(ref_dir)
        try:
            quality = compare_logits(merged_model, model, ids, mask)
        finally:
            del model
    effective = margin.gate(quality, backstop)
    record = {
        "kind": "reference",
        **effective.as_dict(),
        "reference": {
            "what": f"llama.cpp's own quantization of the checked {conversion.record['name']} "
            "conversion, default parameters",
            "sha256": ref_sha[0] if len(ref_sha) == 1 else ref_sha,
            "identical_to_artefact": identical,
            **_figures(quality),
        },
        "margin": margin.as_dict(),
        "backstop": backstop.as_dict(),
    }
    return effective, record
