"""Export: merge the global LoRA adapter into the base and quantize it for devices.

The front door is :func:`export_run`; the parts are usable alone:

* :mod:`~fedlora.export.merge` — adapter + base → merged fp32 checkpoint;
* :mod:`~fedlora.export.int8` — weight-only int8 artefact and its PyTorch runtime;
* :mod:`~fedlora.export.quality` — KL / top-1 / perplexity against a reference, and the gate;
* :mod:`~fedlora.export.reference` — quantized GGUF: the conversion checked exactly, the
  quantization gated against llama.cpp's own;
* :mod:`~fedlora.export.formats` — the registry the pipeline writes formats from;
* :mod:`~fedlora.export.exportdir` — adding artefacts to an export without disturbing it;
* :mod:`~fedlora.export.manifest` — ``manifest.json``, written last, and its verification.
"""

from __future__ import annotations

import importlib
from typing import Any

# Names are imported on first use: ``fedlora export --help`` and the coordinator's
# services read manifests and profiles without paying for torch.
_WHERE = {
    "MERGED": "formats",
    "ExportFormat": "formats",
    "available_formats": "formats",
    "get_format": "formats",
    "register_format": "formats",
    "unregister_format": "formats",
    "load_int8_model": "int8",
    "quantize_int8": "int8",
    "read_manifest": "manifest",
    "verify_export": "manifest",
    "merge_adapter": "merge",
    "export_run": "pipeline",
    "QualityGate": "quality",
    "compare_logits": "quality",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fedlora.export' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedlora.export.{module}"), name)


__all__ = [
    "MERGED",
    "ExportFormat",
    "QualityGate",
    "available_formats",
    "compare_logits",
    "export_run",
    "get_format",
    "load_int8_model",
    "merge_adapter",
    "quantize_int8",
    "read_manifest",
    "register_format",
    "unregister_format",
    "verify_export",
]
