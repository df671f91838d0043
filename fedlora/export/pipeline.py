"""``export_run``: merge → write each format → measure → gate → manifest, all or nothing.

Everything is built in a hidden temp directory next to ``export_dir``
(``.<name>.<random>.tmp``) and renamed into place only after every artefact
passed its gate and the manifest is written, so ``export_dir`` is either absent,
the previous complete export, or the new complete export. A process killed
mid-export can leave that hidden temp directory behind; it is never mistaken
for an export because it is not at ``export_dir``.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import fedlora
from fedlora.errors import ConfigError, ExportError
from fedlora.export.formats import MERGED, MERGED_DIR, MERGED_GATE, ExportFormat, get_format
from fedlora.export.manifest import (
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    file_entries,
    fingerprint,
    read_manifest,
    sha256_file,
    write_manifest,
)
from fedlora.export.merge import (
    ADAPTER_WEIGHTS,
    adapter_summary,
    check_adapter_dir,
    load_fp32_model,
    load_peft_model,
    merge_adapter,
)
from fedlora.export.quality import QualityGate, check_heldout, compare_logits


def resolve_gates(
    formats: Sequence[ExportFormat], gate: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, QualityGate]:
    """Each artefact's gate: its format's default with ``gate[name]`` overriding keys."""
    gates = {MERGED: MERGED_GATE} | {f.name: f.default_gate for f in formats}
    for name, values in (gate or {}).items():
        if name not in gates:
            raise ConfigError(
                f"gate for {name!r}, which is not exported: use one of {sorted(gates)}"
            )
        if not isinstance(values, Mapping):
            raise ConfigError(f"gate[{name!r}] must be a mapping like {gates[name].as_dict()}")
        gates[name] = QualityGate.from_dict(values, gates[name])
    return gates


def _check_target(export: Path) -> None:
    if not export.exists():
        return
    if not export.is_dir():
        raise ExportError(f"{export} exists and is not a directory: choose another export_dir")
    if any(export.iterdir()) and not (export / MANIFEST).is_file():
        raise ExportError(
            f"{export} is not empty and not a fedlora export: choose a new or empty export_dir"
        )
    if (export / MANIFEST).is_file():
        read_manifest(export)  # refuses to replace a directory whose manifest is not ours


def _vocab_size(base: Path) -> int | None:
    try:
        vocab = json.loads((base / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError):
        return None  # loading the base reports this properly
    return vocab if isinstance(vocab, int) else None


def _swap_into_place(tmp: Path, export: Path) -> None:
    old = (
        export.with_name(f".{export.name}.{uuid.uuid4().hex[:8]}.old") if export.exists() else None
    )
    if old is not None:
        os.replace(export, old)
    try:
        os.replace(tmp, export)
    except OSError:
        if old is not None:
            os.replace(old, export)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _gate(name: str, gate: QualityGate, quality: Mapping[str, float], export: Path) -> None:
    reasons = gate.failures(quality)
    if reasons:
        raise ExportError(
            f"{name} artefact failed its quality gate ({'; '.join(reasons)}; "
            f"{quality['tokens']} held-out tokens), so {export} was left as it was: "
            f"ship {MERGED} instead, or loosen gate[{name!r}] if that loss is acceptable"
        )


def _artefact(
    root: Path,
    name: str,
    subdir: str,
    file_format: str,
    quantization: str,
    quality: dict[str, Any],
    gate: QualityGate,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    files = file_entries(root, subdir, fsync=True)
    entry = {
        "name": name,
        "format": file_format,
        "quantization": quantization,
        "path": subdir,
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files),
        "quality": quality,
        "gate": gate.as_dict(),
    }
    if details is not None:
        entry["details"] = details
    return entry


def export_run(
    base_path: str | Path,
    adapter_dir: str | Path,
    export_dir: str | Path,
    heldout_input_ids: torch.Tensor,
    heldout_attention_mask: torch.Tensor,
    formats: Sequence[str] = ("int8",),
    gate: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Export the adapter merged into the base, plus each of ``formats``, and return the manifest.

    ``export_dir`` gets ``merged-fp32/`` (named ``merged/`` on disk), one directory
    per format, and ``manifest.json``. The merged model is measured against
    base + adapter unmerged, each format against the merged model, on the held-out
    tokens; any artefact outside its gate (``gate = {"int8": {"max_kl": ...,
    "min_top1_agreement": ...}}`` overrides the defaults) raises :class:`ExportError`
    and leaves ``export_dir`` as it was.
    """
    base, export = Path(base_path), Path(export_dir)
    fmts = [get_format(name) for name in dict.fromkeys(formats)]
    gates = resolve_gates(fmts, gate)
    adapter = check_adapter_dir(adapter_dir)
    _check_target(export)
    ids, mask = torch.as_tensor(heldout_input_ids), torch.as_tensor(heldout_attention_mask)
    check_heldout(ids, mask, _vocab_size(base))  # before the slow part, not after it

    export.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{export.name}.", suffix=".tmp", dir=export.parent))
    try:
        merged_dir = merge_adapter(base, adapter, tmp / MERGED_DIR)
        merged = load_fp32_model(merged_dir)
        reference = load_peft_model(base, adapter)
        quality = compare_logits(reference, merged, ids, mask)
        del reference
        gc.collect()
        _gate(MERGED, gates[MERGED], quality, export)
        quality["reference"] = "base+adapter"
        artefacts = [
            _artefact(tmp, MERGED, MERGED_DIR, "safetensors", "none", quality, gates[MERGED])
        ]
        for fmt in fmts:
            out = fmt.write(merged_dir, tmp / fmt.name)
            candidate = fmt.load(out)
            quality = compare_logits(merged, candidate, ids, mask)
            del candidate
            _gate(fmt.name, gates[fmt.name], quality, export)
            quality["reference"] = MERGED
            artefacts.append(
                _artefact(
                    tmp,
                    fmt.name,
                    fmt.name,
                    fmt.file_format,
                    fmt.quantization,
                    quality,
                    gates[fmt.name],
                    fmt.describe(out) if fmt.describe else None,
                )
            )
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "fedlora_version": fedlora.__version__,
            "base_model": {"path": str(base.resolve()), "fingerprint": fingerprint(base)},
            "adapter": {
                "path": str(adapter),
                "sha256": sha256_file(adapter / ADAPTER_WEIGHTS),
                "config": adapter_summary(adapter),
            },
            "heldout": {"sequences": int(ids.shape[0]), "tokens": int(quality["tokens"])},
            "artefacts": artefacts,
        }
        write_manifest(tmp, manifest)
        _swap_into_place(tmp, export)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
