"""The export directory: what it holds, one writer at a time, and adding to it atomically.

``RUN_DIR/export/`` collects the artefacts of every export call: the merged model
(``merged/``, made by the first call and the reference of all later ones) and one
directory per artefact, all listed in ``manifest.json``. A call adds its artefacts
and keeps the others, with their manifest entries, byte for byte; it replaces an
artefact only when asked.

The coordinator's ModelService reads manifests while exports run, and a manifest
must never name a file that is not there. So a call

1. builds its artefacts in a hidden temp directory next to the export (nothing
   under ``export/`` changes while it works, and a failure leaves the previous
   manifest byte-identical);
2. moves each into ``export/`` under a directory no manifest entry names
   (``<name>/``, or ``<name>.2/``, ``<name>.3/``… while the artefact it replaces
   still holds ``<name>/``);
3. replaces ``manifest.json`` in one rename, the commit point; readers see the
   old manifest and its files or the new manifest and its files;
4. only then deletes the directories of replaced artefacts.

A process killed between 2 and 3 leaves directories no manifest names; the next
call that wants one of those names removes it (an ``flock`` on the parent
directory means no other export is running then).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedlora.errors import ExportError
from fedlora.export.manifest import MANIFEST, read_manifest, sha256_file, write_manifest


@contextmanager
def export_lock(export: Path) -> Iterator[None]:
    """Hold the only export into ``export`` (an ``flock`` on its parent directory)."""
    fd = os.open(export.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportError(
                f"another export into {export.parent} is running: wait for it to finish"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def previous_export(export: Path) -> dict[str, Any] | None:
    """The manifest of the export already at ``export``; None if there is none yet.

    Refuses a path that is not a directory, or a non-empty directory that is not an
    export: an export never writes over someone else's files.
    """
    if not export.exists():
        return None
    if not export.is_dir():
        raise ExportError(f"{export} exists and is not a directory: choose another export_dir")
    if not (export / MANIFEST).is_file():
        if any(export.iterdir()):
            raise ExportError(
                f"{export} is not empty and not a fedlora export: choose a new or empty export_dir"
            )
        return None
    return read_manifest(export)  # refuses a manifest that is not ours


def check_same_model(
    previous: Mapping[str, Any], identity: Mapping[str, Any], export: Path
) -> None:
    """Refuse to add artefacts of another base or adapter to an existing export."""
    checks = (
        ("base model", ("base_model", "fingerprint", "sha256")),
        ("adapter", ("adapter", "sha256")),
    )
    for what, keys in checks:
        was: Any = previous
        now: Any = identity
        for key in keys:
            was = was.get(key) if isinstance(was, Mapping) else None
            now = now.get(key) if isinstance(now, Mapping) else None
        if was != now:
            raise ExportError(
                f"{export} holds the artefacts of another {what} ({str(was)[:12]}…, this one "
                f"is {str(now)[:12]}…): move that export away, or delete it, to export this one"
            )


def check_not_exported(
    previous: Mapping[str, Any], names: Sequence[str], replace: bool, export: Path
) -> list[dict[str, Any]]:
    """The entries ``names`` would replace; refuses unless ``replace`` if there are any."""
    replaced = [a for a in previous["artefacts"] if a.get("name") in names]
    if replaced and not replace:
        listed = ", ".join(a["name"] for a in replaced)
        raise ExportError(
            f"{export} already holds {listed}: replace it with --replace (replace=True; the "
            "other artefacts stay as they are), or leave it out"
        )
    return replaced


def artefact_dir(entry: Mapping[str, Any]) -> str:
    """The directory of a manifest entry, relative to the export."""
    path = entry.get("path")
    if isinstance(path, str) and path:
        return path
    files = entry.get("files") or [{}]
    return str(files[0].get("path", "")).split("/", 1)[0]


def merged_dir_of(previous: Mapping[str, Any], merged_name: str, export: Path) -> Path:
    """The merged model of an existing export, checked against its manifest entry."""
    entry = next((a for a in previous["artefacts"] if a.get("name") == merged_name), None)
    if entry is None:
        raise ExportError(f"{export}/{MANIFEST} lists no {merged_name}: move that export away")
    for f in entry["files"]:
        path = export / f["path"]
        intact = path.is_file() and path.stat().st_size == f["bytes"]
        if not intact or sha256_file(path) != f["sha256"]:
            raise ExportError(
                f"{path} does not match its manifest entry, and every new artefact would be "
                "made from it: move that export away, or delete it, and export again"
            )
    return export / artefact_dir(entry)


def free_dir(export: Path, taken: set[str], name: str) -> str:
    """A directory for artefact ``name`` that no manifest entry names; marks it taken.

    A directory on disk that no entry names was left by a killed export: removed.
    """
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}.{n}"
    taken.add(candidate)
    leftover = export / candidate
    if leftover.is_dir() and not leftover.is_symlink():
        shutil.rmtree(leftover)
    elif leftover.exists() or leftover.is_symlink():
        leftover.unlink()
    return candidate


def taken_dirs(previous: Mapping[str, Any] | None) -> set[str]:
    return {artefact_dir(a) for a in previous["artefacts"]} if previous else set()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def add_to_export(
    export: Path,
    staged: Path,
    manifest: dict[str, Any],
    new: Sequence[Mapping[str, Any]],
    replaced: Sequence[Mapping[str, Any]],
) -> None:
    """Move the ``new`` artefacts' directories from ``staged`` into ``export``, commit
    ``manifest`` (which lists them), then delete the ``replaced`` artefacts' directories."""
    moved: list[Path] = []
    try:
        for entry in new:
            target = export / artefact_dir(entry)
            os.replace(staged / artefact_dir(entry), target)
            moved.append(target)
        _fsync_dir(export)
        write_manifest(export, manifest)  # the commit point
        _fsync_dir(export)
    except BaseException:
        for path in moved:
            shutil.rmtree(path, ignore_errors=True)
        raise
    keep = {artefact_dir(a) for a in manifest["artefacts"]}
    for entry in replaced:
        old = artefact_dir(entry)
        if old and old not in keep:
            shutil.rmtree(export / old, ignore_errors=True)


def create_export(staged: Path, export: Path) -> None:
    """Rename a complete staged export (manifest written) to ``export``, which is absent or
    an empty directory."""
    if export.exists():
        os.rmdir(export)  # only ever empty here: previous_export refused anything else
    os.replace(staged, export)
    _fsync_dir(export.parent)
