"""Export: merge the global LoRA adapter into the base and quantize it for devices.

The front door is :func:`export_run`; the parts are usable alone:

* :mod:`~fedlora.export.merge` — adapter + base → merged fp32 checkpoint;
* :mod:`~fedlora.export.int8` — weight-only int8 artefact and its PyTorch runtime;
* :mod:`~fedlora.export.quality` — KL / top-1 / perplexity against a reference, and the gate;
* :mod:`~fedlora.export.formats` — the registry the pipeline writes formats from;
* :mod:`~fedlora.export.manifest` — ``manifest.json``, written last, and its verification.
"""

from fedlora.export.formats import (
    MERGED,
    ExportFormat,
    available_formats,
    get_format,
    register_format,
    unregister_format,
)
from fedlora.export.int8 import load_int8_model, quantize_int8
from fedlora.export.manifest import read_manifest, verify_export
from fedlora.export.merge import merge_adapter
from fedlora.export.pipeline import export_run
from fedlora.export.quality import QualityGate, compare_logits

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
