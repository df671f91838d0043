"""The registry of export formats: one module per format, one entry here each.

A format turns the merged fp32 checkpoint into a device artefact (``write``) and
loads that artefact back as something with the transformers causal-LM call
signature (``load``), so :func:`fedlora.export.export_run` can measure it against
the merged model and hold it to its gate. Adding a format (GGUF for llama.cpp)
is a new module plus one :func:`register_format` call; the pipeline and the
manifest need no change.

A format's gate is absolute (``default_gate`` against the merged model) unless it
names a ``reference``: then it is gated within ``margin`` of the runtime's own
quantization of its checked ``conversion``, and ``default_gate`` is only the
backstop (:mod:`fedlora.export.reference` says why).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError
from fedlora.export import gguf, int8
from fedlora.export.quality import QualityGate
from fedlora.export.reference import DEFAULT_MARGIN, Conversion, ReferenceMargin

MERGED = "merged-fp32"
"""Name of the artefact every export has: the adapter merged into the base, fp32."""

MERGED_DIR = "merged"
"""Directory of the merged checkpoint inside an export."""

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")

MERGED_GATE = QualityGate(max_kl=1e-6, min_top1_agreement=0.99)
"""Merged vs base+adapter should differ only by fp32 rounding; more means a bad merge."""


@dataclass(frozen=True)
class ExportFormat:
    """How to write one kind of artefact from the merged checkpoint and load it back."""

    name: str
    """Artefact name, directory name under the export and key of the ``gate`` dict."""
    file_format: str
    """Container of the weights, recorded in the manifest (``safetensors``, ``gguf``)."""
    quantization: str
    """Scheme recorded in the manifest (``int8-weight-only-per-group``)."""
    write: Callable[[Path, Path], Path]
    """``(merged_dir, out_dir) -> out_dir``: write the artefact's files into ``out_dir``."""
    load: Callable[[Path], Any]
    """``artefact_dir -> model``: a runnable model whose logits the quality check compares."""
    default_gate: QualityGate
    """Against the merged model; the backstop when the format has a ``reference``."""
    describe: Callable[[Path], dict[str, Any]] | None = None
    """``artefact_dir -> details`` recorded in the manifest (GGUF: the tensor types written)."""
    conversion: Conversion | None = None
    """The lossless conversion the artefact is made from, checked before it is gated."""
    reference: Callable[[Path, Path], Path] | None = None
    """``(checked conversion file, out_dir) -> out_dir``: the runtime's own quantization of
    the checked conversion to this format's type; the artefact is gated against it."""
    margin: ReferenceMargin = DEFAULT_MARGIN
    """How far the artefact may fall behind its ``reference``."""

    def __post_init__(self) -> None:
        if self.reference is not None and self.conversion is None:
            raise ConfigError(
                f"export format {self.name!r} has a reference but no conversion to make it from"
            )


_FORMATS: dict[str, ExportFormat] = {}


def register_format(fmt: ExportFormat, *, replace: bool = False) -> None:
    """Make ``fmt`` available to ``export_run(formats=...)`` under ``fmt.name``."""
    if fmt.name in (MERGED, MERGED_DIR) or not _NAME.fullmatch(fmt.name):
        raise ConfigError(
            f"export format name {fmt.name!r} is reserved or not a plain directory name: "
            "use lowercase letters, digits, '-' or '_' and not 'merged'"
        )
    if fmt.name in _FORMATS and not replace:
        raise ConfigError(f"export format {fmt.name!r} is already registered: pass replace=True")
    _FORMATS[fmt.name] = fmt


def unregister_format(name: str) -> None:
    _FORMATS.pop(name, None)


def available_formats() -> tuple[str, ...]:
    return tuple(sorted(_FORMATS))


def get_format(name: str) -> ExportFormat:
    try:
        return _FORMATS[name]
    except KeyError:
        raise ConfigError(
            f"unknown export format {name!r}: choose from {list(available_formats())}"
        ) from None


register_format(
    ExportFormat(
        name="int8",
        file_format="safetensors",
        quantization=int8.SCHEME,
        write=lambda merged, out: int8.quantize_int8(merged, out),
        load=lambda path: int8.load_int8_model(path),
        # Perplexity is the gate; KL and top-1 are backstops against a broken quantizer. On
        # SmolLM2-135M (512 tokens of other text) groups of 32 give +0.01 % perplexity, KL
        # 1.2e-3, top-1 0.965 (a 135 M model breaks many near-ties); the earlier one-scale-
        # per-row scheme gave +1.2 %, KL 3.0e-3, top-1 0.947 and fails here.
        default_gate=QualityGate(
            max_kl=4e-3, min_top1_agreement=0.95, max_perplexity_increase=0.01
        ),
    )
)

# GGUF for llama.cpp. Every GGUF artefact is made from fedlora's F32 conversion, which
# is checked exactly first (gguf.CONVERSION). F32 / F16 lose nothing to llama.cpp's
# quantization: absolute gates against the merged model. Q8_0 / Q4_K_M are gated against
# llama.cpp's own quantization of the checked conversion; their gates here are backstops
# against a llama.cpp that wrecks a model, loose enough for what it loses on the smallest
# real model (SmolLM2-135M: Q8_0 KL 8.1e-3, top-1 0.936; Q4_K_M 8.4e-2, 0.835).
for _quant, _gate, _reference in (
    ("f32", QualityGate(max_kl=1e-5, min_top1_agreement=0.99), False),
    ("f16", QualityGate(max_kl=1e-4, min_top1_agreement=0.99), False),
    ("q8_0", QualityGate(max_kl=5e-2, min_top1_agreement=0.85), True),
    ("q4_k_m", QualityGate(max_kl=3e-1, min_top1_agreement=0.70), True),
):
    register_format(
        ExportFormat(
            name=f"gguf-{_quant}",
            file_format="gguf",
            quantization=_quant.upper(),
            write=partial(gguf.write_gguf, quant=_quant),
            load=gguf.load_gguf,
            default_gate=_gate,
            describe=gguf.describe_gguf,
            conversion=gguf.CONVERSION,
            reference=partial(gguf.reference_gguf, quant=_quant) if _reference else None,
        )
    )
