"""ModelService: the models the coordinator has released, listed and streamed to devices.

A released model is one artefact of a finished export,
``DIR/runs/<run>/export/manifest.json`` (written last by ``fedlora.export``, so
its presence means the export is complete), whose quality figures are inside its
gate; its version is ``<run>/<artefact name>``. Only files the manifest lists can
be downloaded, and only from inside their export directory, so a request for
``../../tls/ca.key`` finds nothing to send. Downloads resume: the request names
an offset, and the header gives the SHA-256 of the bytes before it, so a device
checks its partial file is a true prefix before appending to it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import grpc

from fedlora.errors import ConfigError, ExportError
from fedlora.export.manifest import MANIFEST, read_manifest
from fedlora.export.quality import QualityGate
from fedlora.server.service.auth import Caller
from fedlora.server.service.status import abort
from fedlora.v1 import model_service_pb2 as pb

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
_QUALITY = ("kl", "top1_agreement", "perplexity")


@dataclass(frozen=True)
class ReleasedFile:
    path: str  # relative to the export directory, "/"-separated
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class ReleasedModel:
    version: str
    run: str
    name: str
    format: str
    quantization: str
    files: tuple[ReleasedFile, ...]
    quality: dict[str, Any]
    export_dir: Path

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    def to_proto(self) -> pb.Model:
        q = self.quality
        quality = pb.Quality(
            reference=str(q.get("reference", "")),
            **{k: float(q[k]) for k in _QUALITY if isinstance(q.get(k), int | float)},
        )
        return pb.Model(
            version=self.version,
            run=self.run,
            name=self.name,
            format=self.format,
            quantization=self.quantization,
            size_bytes=self.size_bytes,
            files=[
                pb.ModelFile(path=f.path, size_bytes=f.size_bytes, sha256=f.sha256)
                for f in self.files
            ],
            quality=quality,
        )


def passed_gate(artefact: dict[str, Any]) -> bool:
    """Whether the artefact's quality figures are inside its gate, re-checked with
    :class:`~fedlora.export.quality.QualityGate` rather than trusted because a manifest
    exists. An artefact without a gate or figures is not released."""
    quality, gate = artefact.get("quality"), artefact.get("gate")
    if not isinstance(quality, dict) or not isinstance(gate, dict):
        return False
    try:
        checked = QualityGate(float(gate["max_kl"]), float(gate["min_top1_agreement"]))
        return not checked.failures(quality)
    except (KeyError, TypeError, ValueError, ConfigError):
        return False


def _safe_relative(path: str) -> bool:
    p = PurePosixPath(path)
    return bool(path) and "\\" not in path and not p.is_absolute() and ".." not in p.parts


def _models_of(run: str, export_dir: Path) -> list[ReleasedModel]:
    manifest = read_manifest(export_dir)
    models = []
    for artefact in manifest.get("artefacts", []):
        name = str(artefact.get("name", ""))
        if not passed_gate(artefact):
            log.warning("%s/%s is outside its quality gate: not released", run, name)
            continue
        files = tuple(
            ReleasedFile(str(f["path"]), int(f["bytes"]), str(f["sha256"]))
            for f in artefact.get("files", [])
        )
        if not files or not all(_safe_relative(f.path) for f in files):
            log.warning("%s/%s lists no files or unsafe paths: not released", run, name)
            continue
        models.append(
            ReleasedModel(
                version=f"{run}/{name}",
                run=run,
                name=name,
                format=str(artefact.get("format", "")),
                quantization=str(artefact.get("quantization", "")),
                files=files,
                quality=dict(artefact.get("quality", {})),
                export_dir=export_dir,
            )
        )
    return models


class ReleasedModels:
    """Every released model under ``DIR/runs``; a manifest is re-read only when it changed."""

    def __init__(self, data_dir: str | Path) -> None:
        self.runs_dir = Path(data_dir) / "runs"
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[tuple[int, int], list[ReleasedModel]]] = {}

    def all(self) -> list[ReleasedModel]:
        models: list[ReleasedModel] = []
        manifests = sorted(self.runs_dir.glob(f"*/export/{MANIFEST}"))
        with self._lock:
            for path in manifests:
                try:
                    st = path.stat()
                except FileNotFoundError:  # an export being replaced right now
                    continue
                stamp = (st.st_mtime_ns, st.st_size)
                cached = self._cache.get(path)
                if cached is None or cached[0] != stamp:
                    run = path.parent.parent.name
                    try:
                        cached = (stamp, _models_of(run, path.parent))
                    except (ExportError, KeyError, TypeError, ValueError) as err:
                        log.warning("skipping the export of run %s: %s", run, err)
                        cached = (stamp, [])
                    self._cache[path] = cached
                models += cached[1]
        return sorted(models, key=lambda m: m.version)

    def get(self, version: str) -> ReleasedModel | None:
        return next((m for m in self.all() if m.version == version), None)


def _prefix_sha256(f: Any, offset: int) -> str:
    digest = hashlib.sha256()
    remaining = offset
    while remaining:
        block = f.read(min(remaining, 1 << 20))
        if not block:
            break
        digest.update(block)
        remaining -= len(block)
    return digest.hexdigest()


class ModelServicer:
    """ListModels and DownloadModel; any registered device (or the operator) may call them."""

    def __init__(self, data_dir: str | Path, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.models = ReleasedModels(data_dir)
        self.chunk_bytes = chunk_bytes

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext, caller: Caller
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[m.to_proto() for m in self.models.all()])

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext, caller: Caller
    ) -> Iterator[pb.DownloadModelResponse]:
        # Everything that can be refused is checked before the stream starts.
        if not _safe_relative(request.path):
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"path {request.path!r} is not a file path from ListModels (relative, no '..')",
            )
        model = self.models.get(request.version)
        if model is None:
            abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no released model {request.version!r}: ListModels shows what is available",
            )
        entry = next((f for f in model.files if f.path == request.path), None)
        if entry is None:
            abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"model {model.version} has no file {request.path!r}: its files are "
                + ", ".join(f.path for f in model.files),
            )
        root = model.export_dir.resolve()
        path = (root / entry.path).resolve()
        if not path.is_relative_to(root):  # a symlink out of the export directory
            abort(context, grpc.StatusCode.PERMISSION_DENIED, f"{entry.path} is outside the export")
        if not path.is_file() or path.stat().st_size != entry.size_bytes:
            abort(
                context,
                grpc.StatusCode.DATA_LOSS,
                f"the coordinator's copy of {model.version} {entry.path} does not match its "
                "manifest: the operator must re-export it",
            )
        if request.offset > entry.size_bytes:
            abort(
                context,
                grpc.StatusCode.OUT_OF_RANGE,
                f"offset {request.offset} is past the end of {entry.path} ({entry.size_bytes} "
                "bytes): delete the partial download and start again",
            )
        return self._stream(model, entry, path, request.offset, context)

    def _stream(
        self,
        model: ReleasedModel,
        entry: ReleasedFile,
        path: Path,
        offset: int,
        context: grpc.ServicerContext,
    ) -> Iterator[pb.DownloadModelResponse]:
        with path.open("rb") as f:
            prefix = _prefix_sha256(f, offset) if offset else ""
            yield pb.DownloadModelResponse(
                header=pb.DownloadHeader(
                    version=model.version,
                    path=entry.path,
                    size_bytes=entry.size_bytes,
                    sha256=entry.sha256,
                    offset=offset,
                    prefix_sha256=prefix,
                )
            )
            f.seek(offset)
            position = offset
            while context.is_active() and (data := f.read(self.chunk_bytes)):
                yield pb.DownloadModelResponse(chunk=pb.DownloadChunk(offset=position, data=data))
                position += len(data)
