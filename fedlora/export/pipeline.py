"""``export_run``: merge → write each format → measure → gate → add to the export.

One call exports the requested formats all or nothing, and adds them to what
``export_dir`` already holds (:mod:`fedlora.export.exportdir`: the merged model of
the first call is reused, earlier artefacts and their manifest entries are kept,
one is replaced only with ``replace=True``). Everything is built in a hidden temp
directory next to ``export_dir`` (``.<name>.<random>.tmp``) and moved in only
after every artefact passed its gate; the manifest is replaced last, in one
rename, so ``export_dir`` holds the previous complete export or the new one. A
process killed mid-export can leave that hidden temp directory behind; it is
never mistaken for an export because it is not at ``export_dir``.

Gates: the merged model against base + adapter unmerged; int8, GGUF F32 and F16
against the merged model with absolute thresholds; quantized GGUF against
llama.cpp's own quantization of fedlora's checked F32 conversion
(:mod:`fedlora.export.reference` explains why, and what each part catches).
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import fedlora
from fedlora.errors import ConfigError, ExportError
from fedlora.export.exportdir import (
    add_to_export,
    check_not_exported,
    check_same_model,
    create_export,
    export_lock,
    free_dir,
    merged_dir_of,
    previous_export,
    taken_dirs,
)
from fedlora.export.formats import (
    MERGED,
    MERGED_DIR,
    MERGED_GATE,
    ExportFormat,
    available_formats,
    get_format,
)
from fedlora.export.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    file_entries,
    fingerprint,
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
from fedlora.export.reference import CheckedConversion, check_conversion, reference_gate


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


def check_configured_gates(configured: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse ``export.gates`` that name no known artefact or a key no gate has (before a
    run trains, not when it exports)."""
    resolve_gates([get_format(name) for name in available_formats()], configured)


def gates_for(
    formats: Sequence[str],
    configured: Mapping[str, Mapping[str, Any]],
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The gate overrides of one export of ``formats``: the configured ones (``export.gates``)
    for what this export writes, then ``overrides`` (``--gate``) key by key on top."""
    kept = {MERGED, *formats}
    out = {name: dict(values) for name, values in configured.items() if name in kept}
    for name, values in (overrides or {}).items():
        out[name] = out.get(name, {}) | dict(values)
    return out


def _vocab_size(base: Path) -> int | None:
    try:
        vocab = json.loads((base / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError):
        return None  # loading the base reports this properly
    return vocab if isinstance(vocab, int) else None


def _gate(
    name: str,
    gate: QualityGate,
    quality: Mapping[str, Any],
    export: Path,
    record: Mapping[str, Any] | None = None,
) -> None:
    reasons = gate.failures(quality)
    if not reasons:
        return
    why = ""
    if record is not None and record.get("kind") == "reference":
        ref, margin = record["reference"], record["margin"]
        why = (
            f"; llama.cpp's own quantization of the checked conversion gives KL "
            f"{ref['kl']:.3g}, top-1 {ref['top1_agreement']:.4f}, and the artefact may lose at "
            f"most {margin['kl_factor']:g}x that KL + {margin['kl_slack']:g} and "
            f"{margin['top1_slack']:g} top-1"
        )
    raise ExportError(
        f"{name} artefact failed its quality gate ({'; '.join(reasons)}{why}; "
        f"{quality['tokens']} held-out tokens), so {export} was left as it was: "
        f"ship {MERGED} instead, or, if that loss is acceptable, loosen its gate "
        f"(fedlora export --gate {name}.KEY=VALUE, or export.gates in the config)"
    )


def _artefact(
    root: Path,
    name: str,
    subdir: str,
    file_format: str,
    quantization: str,
    quality: dict[str, Any],
    gate: Mapping[str, Any],
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
        "gate": dict(gate),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fedlora_version": fedlora.__version__,
    }
    if details is not None:
        entry["details"] = details
    return entry


class _Measure:
    """What every artefact of one call is measured with: the merged model, the held-out
    tokens, and the conversions checked so far (each once per call)."""

    def __init__(
        self, merged_dir: Path, ids: torch.Tensor, mask: torch.Tensor, scratch: Path
    ) -> None:
        self.merged_dir, self.ids, self.mask, self.scratch = merged_dir, ids, mask, scratch
        self.merged = load_fp32_model(merged_dir)
        self.conversions: dict[str, CheckedConversion] = {}

    def conversion(self, fmt: ExportFormat) -> CheckedConversion | None:
        conv = fmt.conversion
        if conv is None:
            return None
        if conv.name not in self.conversions:
            self.scratch.mkdir(parents=True, exist_ok=True)
            self.conversions[conv.name] = check_conversion(
                conv, self.merged_dir, self.merged, self.ids, self.mask, self.scratch
            )
        return self.conversions[conv.name]

    def artefact(
        self, fmt: ExportFormat, root: Path, subdir: str, backstop: QualityGate, export: Path
    ) -> dict[str, Any]:
        """Write ``fmt`` into ``root/subdir``, gate it, and return its manifest entry."""
        conversion = self.conversion(fmt)  # a wrong conversion fails before anything is written
        out = fmt.write(self.merged_dir, root / subdir)
        candidate = fmt.load(out)
        try:
            quality = compare_logits(self.merged, candidate, self.ids, self.mask)
        finally:
            del candidate
            gc.collect()
        gate: QualityGate = backstop
        record: dict[str, Any] = {"kind": "absolute", **backstop.as_dict()}
        if fmt.reference is not None and conversion is not None:
            gate, record = reference_gate(
                fmt.name,
                fmt.reference,
                fmt.load,
                out,
                quality,
                conversion,
                self.merged,
                self.ids,
                self.mask,
                self.scratch,
                fmt.margin,
                backstop,
            )
        if conversion is not None:
            record["conversion"] = conversion.record
        _gate(fmt.name, gate, quality, export, record)
        quality["reference"] = MERGED
        return _artefact(
            root,
            fmt.name,
            subdir,
            fmt.file_format,
            fmt.quantization,
            quality,
            record,
            fmt.describe(out) if fmt.describe else None,
        )


def _merge_and_check(
    base: Path,
    adapter: Path,
    root: Path,
    ids: torch.Tensor,
    mask: torch.Tensor,
    gate: QualityGate,
    export: Path,
) -> dict[str, Any]:
    """Merge into ``root/merged``, check it against base + adapter, return its entry."""
    merged_dir = merge_adapter(base, adapter, root / MERGED_DIR)
    merged = load_fp32_model(merged_dir)
    reference = load_peft_model(base, adapter)
    quality = compare_logits(reference, merged, ids, mask)
    del reference, merged
    gc.collect()
    _gate(MERGED, gate, quality, export)
    quality["reference"] = "base+adapter"
    record = {"kind": "absolute", **gate.as_dict()}
    return _artefact(root, MERGED, MERGED_DIR, "safetensors", "none", quality, record)


def export_run(
    base_path: str | Path,
    adapter_dir: str | Path,
    export_dir: str | Path,
    heldout_input_ids: torch.Tensor,
    heldout_attention_mask: torch.Tensor,
    formats: Sequence[str] = ("int8",),
    gate: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    replace: bool = False,
) -> dict[str, Any]:
    """Export ``formats`` of the adapter merged into the base, add them to ``export_dir``,
    and return the manifest.

    The first call writes ``merged-fp32`` (``merged/`` on disk), checked against
    base + adapter unmerged; every call adds one directory per format, gated against
    the merged model (``gate = {"int8": {"max_kl": ..., "min_top1_agreement": ...}}``
    overrides a format's absolute gate, or a quantized GGUF's backstop), and keeps
    what is already there. A format already exported is refused unless ``replace``.
    Any failure raises :class:`ExportError` (or :class:`ConfigError` for bad
    options) and leaves ``export_dir`` and its manifest exactly as they were.
    """
    base, export = Path(base_path), Path(export_dir)
    fmts = [get_format(name) for name in dict.fromkeys(formats)]
    gates = resolve_gates(fmts, gate)
    adapter = check_adapter_dir(adapter_dir)
    previous_export(export)  # refuse a foreign directory before the slow part
    ids, mask = torch.as_tensor(heldout_input_ids), torch.as_tensor(heldout_attention_mask)
    check_heldout(ids, mask, _vocab_size(base))  # before the slow part, not after it

    export.parent.mkdir(parents=True, exist_ok=True)
    with export_lock(export):
        previous = previous_export(export)  # again, now that no other export can change it
        identity = {
            "base_model": {"path": str(base.resolve()), "fingerprint": fingerprint(base)},
            "adapter": {
                "path": str(adapter),
                "sha256": sha256_file(adapter / ADAPTER_WEIGHTS),
                "config": adapter_summary(adapter),
            },
        }
        replaced: list[dict[str, Any]] = []
        if previous is not None:
            check_same_model(previous, identity, export)
            replaced = check_not_exported(previous, [f.name for f in fmts], replace, export)
            if not fmts:
                return previous  # nothing to add: the export is left untouched
        tmp = Path(tempfile.mkdtemp(prefix=f".{export.name}.", suffix=".tmp", dir=export.parent))
        try:
            return _export_into(
                export, tmp, previous, replaced, identity, base, adapter, fmts, gates, ids, mask
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _export_into(
    export: Path,
    tmp: Path,
    previous: dict[str, Any] | None,
    replaced: list[dict[str, Any]],
    identity: dict[str, Any],
    base: Path,
    adapter: Path,
    fmts: Sequence[ExportFormat],
    gates: Mapping[str, QualityGate],
    ids: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, Any]:
    if previous is None:
        kept = [_merge_and_check(base, adapter, tmp, ids, mask, gates[MERGED], export)]
        merged_dir = tmp / MERGED_DIR
    else:
        merged_dir = merged_dir_of(previous, MERGED, export)
        kept = list(previous["artefacts"])
    measure = _Measure(merged_dir, ids, mask, tmp / ".scratch")
    taken = taken_dirs(previous) | {MERGED_DIR}
    new = [
        measure.artefact(fmt, tmp, free_dir(export, taken, fmt.name), gates[fmt.name], export)
        for fmt in fmts
    ]
    del measure
    gc.collect()
    shutil.rmtree(tmp / ".scratch", ignore_errors=True)
    by_name = {a["name"]: a for a in new}
    artefacts = [by_name.pop(a["name"], a) for a in kept] + list(by_name.values())
    if previous is None:
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "fedlora_version": fedlora.__version__,
            **identity,
            "heldout": {
                "sequences": int(ids.shape[0]),
                "tokens": int(kept[0]["quality"]["tokens"]),
            },
            "artefacts": artefacts,
        }
        write_manifest(tmp, manifest)
        create_export(tmp, export)
    else:
        manifest = {**previous, "fedlora_version": fedlora.__version__, "artefacts": artefacts}
        add_to_export(export, tmp, manifest, new, replaced)
    return manifest
