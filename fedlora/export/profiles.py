"""Device profiles, and ``(file format, quantization)`` pairs, to export format names.

A profile names a class of device and picks one container and quantization
for it; the registry name (:mod:`fedlora.export.formats`) is what
:func:`fedlora.export.export_run` takes.

============  ==========  ============  ==================================================
profile       format      quantization  why
============  ==========  ============  ==================================================
phone-low     gguf        q4_k_m        ≤ 4 GB RAM: smallest file llama.cpp runs well
phone-high    gguf        q8_0          flagship phones: llama.cpp's near-lossless type,
                                        about half of F16
laptop        gguf        f16           memory to spare: F16 weights, quality first
============  ==========  ============  ==================================================

``safetensors`` + ``int8`` is the weight-only int8 artefact run by PyTorch
(:mod:`fedlora.export.int8`); ``safetensors`` + ``fp32`` is the merged model
alone, which every export contains anyway. ``executorch`` is not implemented.
Quantization names are unique across file formats, so a quantization alone names
its format (:func:`format_of`).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.errors import ConfigError

QUANTIZATIONS: dict[str, dict[str, str | None]] = {
    "gguf": {"f32": "gguf-f32", "f16": "gguf-f16", "q8_0": "gguf-q8_0", "q4_k_m": "gguf-q4_k_m"},
    "safetensors": {"int8": "int8", "fp32": None},
}
"""Per file format: quantization → registry name (``None``: the merged fp32 model only)."""

DEFAULT_QUANT = {"gguf": "q8_0", "safetensors": "int8"}
UNSUPPORTED_FORMATS = {"executorch": "ExecuTorch export is not implemented yet"}


@dataclass(frozen=True)
class Profile:
    name: str
    file_format: str
    quantization: str
    description: str


PROFILES = {
    p.name: p
    for p in (
        Profile("phone-low", "gguf", "q4_k_m", "low-memory phones (≤ 4 GB RAM), llama.cpp"),
        Profile("phone-high", "gguf", "q8_0", "flagship phones, llama.cpp"),
        Profile("laptop", "gguf", "f16", "laptops and desktops, llama.cpp"),
    )
}


def format_name(file_format: str, quantization: str | None = None) -> str | None:
    """The registry name for ``file_format`` + ``quantization`` (its default when None)."""
    if file_format in UNSUPPORTED_FORMATS:
        raise ConfigError(
            f"{UNSUPPORTED_FORMATS[file_format]}: choose --format from {sorted(QUANTIZATIONS)}"
        )
    if file_format not in QUANTIZATIONS:
        raise ConfigError(
            f"unknown export format {file_format!r}: choose from {sorted(QUANTIZATIONS)}"
        )
    quant = (quantization or DEFAULT_QUANT[file_format]).lower()
    choices = QUANTIZATIONS[file_format]
    if quant not in choices:
        raise ConfigError(
            f"unknown quantization {quantization!r} for {file_format}: choose from {list(choices)}"
        )
    return choices[quant]


def format_of(quantization: str) -> str:
    """The file format a quantization belongs to (``q8_0`` → ``gguf``)."""
    quant = quantization.lower()
    for file_format, choices in QUANTIZATIONS.items():
        if quant in choices:
            return file_format
    known = sorted({q for choices in QUANTIZATIONS.values() for q in choices})
    raise ConfigError(f"unknown quantization {quantization!r}: choose from {known}")


def profile_formats(profile: str) -> tuple[str, ...]:
    """The export format names of a device profile."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}: choose from {sorted(PROFILES)}")
    p = PROFILES[profile]
    name = format_name(p.file_format, p.quantization)
    return (name,) if name else ()
