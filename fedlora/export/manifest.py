"""``manifest.json``: what an export holds, how to check it, and that it is complete.

The manifest is written last, atomically, and the export directory only appears
once it is in place, so a directory with a manifest is a finished export. A device
or a CI step checks downloaded files with :func:`verify_export`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from fedlora.errors import ExportError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fedlora.export.manifest"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


def sha256_file(path: Path, *, fsync: bool = False) -> str:
    """Hex sha256 of a file; with ``fsync`` also flushes it to disk first."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if fsync:
            os.fsync(f.fileno())
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(root: Path, subdir: str, *, fsync: bool = False) -> list[dict[str, Any]]:
    """``{"path", "sha256", "bytes"}`` for every file under ``root/subdir``, sorted by path.

    Paths are relative to ``root`` with ``/`` separators.
    """
    base = root / subdir
    files = sorted(p for p in base.rglob("*") if p.is_file())
    return [
        {
            "path": p.relative_to(root).as_posix(),
            "sha256": sha256_file(p, fsync=fsync),
            "bytes": p.stat().st_size,
        }
        for p in files
    ]


def fingerprint(model_dir: Path) -> dict[str, Any]:
    """The base model's identity: ``fedlora.model.model_fingerprint`` and the files it covers."""
    from fedlora.model import model_fingerprint

    names = sorted(
        p.name
        for p in model_dir.iterdir()
        if p.is_file() and (p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    )
    return {"sha256": model_fingerprint(model_dir), "files": names}


def write_manifest(export_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write ``export_dir/manifest.json`` atomically (temp file, fsync, rename)."""
    path = export_dir / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    """The manifest of a finished export, or :class:`ExportError` if there is none."""
    path = Path(export_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ExportError(
            f"no readable {MANIFEST} in {export_dir}: the export is incomplete, re-run it"
        ) from err
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise ExportError(
            f"{path} is not a version-{MANIFEST_VERSION} {MANIFEST_FORMAT}: "
            "re-export with this version of fedlora"
        )
    return manifest


def verify_export(export_dir: str | Path) -> dict[str, Any]:
    """Check every file the manifest lists against its size and sha256; return the manifest."""
    root = Path(export_dir)
    manifest = read_manifest(root)
    for artefact in manifest["artefacts"]:
        for entry in artefact["files"]:
            path = root / entry["path"]
            if not path.is_file():
                raise ExportError(f"{path} is listed in the manifest but missing: re-download it")
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise ExportError(f"{path} does not match its manifest entry: re-download it")
    return manifest
