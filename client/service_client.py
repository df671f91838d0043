"""What a device calls on the coordinator: released models, downloads, its privacy budget.

Every call is signed with the device's key (the one from ``fedlora keys
device``; see :mod:`fedlora.keys.signing`) and, unless ``root_cert`` is None,
travels over TLS checked against the coordinator's CA. A download is written to
``DEST.part`` and installed (renamed over ``DEST``) only after its size and
SHA-256 match what the coordinator listed, so a device never runs a corrupt or
truncated model. An interrupted download keeps its ``.part`` and the next call
resumes from its end; the coordinator first sends the SHA-256 of the bytes
before that point, and a ``.part`` that is not a true prefix is deleted and the
file fetched again from the start.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import grpc

from fedlora.errors import ConfigError, ExportError, FedloraError
from fedlora.export.manifest import sha256_file
from fedlora.keys import load_private_key, sign_call
from fedlora.v1 import model_service_pb2 as model_pb
from fedlora.v1 import model_service_pb2_grpc as model_grpc
from fedlora.v1 import privacy_service_pb2 as privacy_pb
from fedlora.v1 import privacy_service_pb2_grpc as privacy_grpc

DEFAULT_TIMEOUT_S = 30.0


class ServiceCallError(FedloraError):
    """A call to the coordinator's services failed; ``code`` is its gRPC status.

    Kept next to the client (not in ``fedlora.errors``) because only callers of
    the coordinator's services can meet it.
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class RemoteModel:
    """A released model as ListModels describes it."""

    version: str
    run: str
    name: str
    format: str
    quantization: str
    size_bytes: int
    files: tuple[RemoteFile, ...]
    quality: dict[str, float]  # kl, top1_agreement, perplexity: those the export measured
    quality_reference: str

    @classmethod
    def from_proto(cls, m: model_pb.Model) -> RemoteModel:
        quality = {
            k: getattr(m.quality, k)
            for k in ("kl", "top1_agreement", "perplexity")
            if m.quality.HasField(k)
        }
        return cls(
            version=m.version,
            run=m.run,
            name=m.name,
            format=m.format,
            quantization=m.quantization,
            size_bytes=m.size_bytes,
            files=tuple(RemoteFile(f.path, f.size_bytes, f.sha256) for f in m.files),
            quality=quality,
            quality_reference=m.quality.reference,
        )


@dataclass(frozen=True)
class DeviceLevelBudget:
    """Device-level ε (the unit: the device's whole data) as the coordinator accounts it."""

    epsilon_spent: float
    epsilon_remaining: float
    epsilon_budget: float
    delta: float
    accountant: str
    rounds: int
    runs: tuple[str, ...]

    @classmethod
    def from_proto(cls, r: privacy_pb.DeviceLevelBudget) -> DeviceLevelBudget:
        return cls(
            epsilon_spent=r.epsilon_spent,
            epsilon_remaining=r.epsilon_remaining,
            epsilon_budget=r.epsilon_budget,
            delta=r.delta,
            accountant=r.accountant,
            rounds=r.rounds,
            runs=tuple(r.runs),
        )


@dataclass(frozen=True)
class Budget:
    """A device's privacy budget as the coordinator's ledgers account it: record-level
    (the ``epsilon_*`` fields, DP-SGD) and, where it applies, device-level."""

    device_id: str
    epsilon_spent: float
    epsilon_remaining: float
    epsilon_budget: float
    delta: float
    accountant: str
    rounds_trained: int
    runs: tuple[str, ...]
    budget_run: str
    policy_unit: str
    device_level: DeviceLevelBudget | None

    @classmethod
    def from_proto(cls, r: privacy_pb.GetBudgetResponse) -> Budget:
        return cls(
            device_id=r.device_id,
            epsilon_spent=r.epsilon_spent,
            epsilon_remaining=r.epsilon_remaining,
            epsilon_budget=r.epsilon_budget,
            delta=r.delta,
            accountant=r.accountant,
            rounds_trained=r.rounds_trained,
            runs=tuple(r.runs),
            budget_run=r.budget_run,
            policy_unit=r.policy_unit or "record",  # a coordinator from before units
            device_level=(
                DeviceLevelBudget.from_proto(r.device_level) if r.HasField("device_level") else None
            ),
        )


def _method(module: Any, service: str, rpc: str) -> str:
    return f"/{module.DESCRIPTOR.services_by_name[service].full_name}/{rpc}"


LIST_MODELS = _method(model_pb, "ModelService", "ListModels")
DOWNLOAD_MODEL = _method(model_pb, "ModelService", "DownloadModel")
GET_BUDGET = _method(privacy_pb, "PrivacyService", "GetBudget")
GET_FLEET_REPORT = _method(privacy_pb, "PrivacyService", "GetFleetReport")


def _check_relative(path: str) -> PurePosixPath:
    p = PurePosixPath(path)
    if (
        not path
        or "\\" in path
        or "\0" in path
        or p.is_absolute()
        or ".." in p.parts
        or not p.parts
        or p.name in ("", ".")
    ):
        raise ConfigError(f"{path!r} is not a model file path from list_models()")
    return p


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Restart(Exception):
    """The ``.part`` was not a prefix of the coordinator's file and was deleted."""


class DeviceServiceClient:
    """A device's (or, with ``device_id="operator"`` and ``DIR/tls/operator.key``, the
    operator's) connection to the coordinator's ModelService and PrivacyService.

    ``address`` is ``HOST:PORT``; ``root_cert`` the coordinator's ``ca.crt``, or None
    for plaintext (local trials only).
    """

    def __init__(
        self,
        address: str,
        root_cert: str | Path | None,
        device_id: str,
        private_key: str | Path,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.address = address
        self.device_id = device_id
        self.timeout = timeout
        self._key = load_private_key(private_key)
        if root_cert is None:
            self._channel = grpc.insecure_channel(address)
        else:
            try:
                ca = Path(root_cert).read_bytes()
            except OSError as err:
                raise ConfigError(
                    f"cannot read the coordinator's CA certificate {root_cert}: "
                    f"{err.strerror or err}"
                ) from None
            creds = grpc.ssl_channel_credentials(root_certificates=ca)
            self._channel = grpc.secure_channel(address, creds)
        self._models = model_grpc.ModelServiceStub(self._channel)
        self._privacy = privacy_grpc.PrivacyServiceStub(self._channel)

    def wait_ready(self, timeout: float) -> None:
        """Wait until the connection is up (TLS handshake done), at most ``timeout`` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ServiceCallError(
                f"cannot reach the coordinator's services at {self.address} within "
                f"{timeout:g} s: is it running, and is this its CA certificate?",
                grpc.StatusCode.UNAVAILABLE,
            ) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DeviceServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- calls
    def _signed(self, method: str) -> tuple[tuple[str, str | bytes], ...]:
        return sign_call(self._key, method, self.device_id)

    def _error(self, err: grpc.RpcError, method: str) -> ServiceCallError:
        code, details = err.code(), err.details() or "no details"
        rpc = method.rsplit("/", 1)[-1]
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            message = f"cannot reach the coordinator at {self.address} ({rpc}): {details}"
        else:
            message = f"the coordinator at {self.address} refused {rpc}: {details}"
        return ServiceCallError(message, code)

    def _unary(self, stub_method: Any, method: str, request: Any) -> Any:
        try:
            return stub_method(request, metadata=self._signed(method), timeout=self.timeout)
        except grpc.RpcError as err:
            raise self._error(err, method) from None

    def list_models(self) -> list[RemoteModel]:
        """Every model the coordinator has released, by version."""
        response = self._unary(self._models.ListModels, LIST_MODELS, model_pb.ListModelsRequest())
        return [RemoteModel.from_proto(m) for m in response.models]

    def budget(self, device_id: str | None = None) -> Budget:
        """This device's budget (another device's: operator only)."""
        request = privacy_pb.GetBudgetRequest(device_id=device_id or "")
        return Budget.from_proto(self._unary(self._privacy.GetBudget, GET_BUDGET, request))

    def fleet_report(self, run: str | None = None) -> tuple[str, str]:
        """``(run, report JSON)`` of ``run`` or the latest run; operator only."""
        request = privacy_pb.GetFleetReportRequest(run=run or "")
        response = self._unary(self._privacy.GetFleetReport, GET_FLEET_REPORT, request)
        return response.run, response.report_json

    # -------------------------------------------------------------- download
    def _find(self, version: str, path: str) -> RemoteFile:
        models = {m.version: m for m in self.list_models()}
        model = models.get(version)
        if model is None:
            raise ExportError(
                f"the coordinator has no released model {version!r} (it has: "
                f"{', '.join(sorted(models)) or 'none'})"
            )
        entry = next((f for f in model.files if f.path == path), None)
        if entry is None:
            raise ExportError(
                f"model {version} has no file {path!r} (its files: "
                f"{', '.join(f.path for f in model.files)})"
            )
        return entry

    def download(self, version: str, path: str, dest_dir: str | Path) -> Path:
        """Fetch one file of a released model to ``dest_dir/path``, resuming a partial one.

        Installed only once its size and SHA-256 match ListModels; a corrupt transfer
        raises :class:`ExportError` and deletes the ``.part``, a truncated one raises
        :class:`ExportError` and keeps it for the next call to resume.
        """
        rel = _check_relative(path)
        entry = self._find(version, path)
        dest = Path(dest_dir).joinpath(*rel.parts)
        installed = dest.is_file() and dest.stat().st_size == entry.size_bytes
        if installed and sha256_file(dest) == entry.sha256:
            return dest  # already installed, nothing to fetch
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        try:
            self._transfer(version, entry, part)
        except _Restart:
            self._transfer(version, entry, part)  # from 0: the .part was deleted
        got = sha256_file(part)
        if got != entry.sha256:
            part.unlink(missing_ok=True)
            raise ExportError(
                f"{version} {path} arrived corrupted (sha256 {got[:16]}…, expected "
                f"{entry.sha256[:16]}…): nothing was installed and the partial file was "
                "deleted; download it again"
            )
        os.replace(part, dest)
        _fsync_dir(dest.parent)
        return dest

    def _transfer(self, version: str, entry: RemoteFile, part: Path) -> None:
        """Append the rest of the file to ``part``; return when it has every byte."""
        offset = part.stat().st_size if part.exists() else 0
        if offset > entry.size_bytes:  # longer than the file: cannot be a prefix of it
            part.unlink()
            offset = 0
        request = model_pb.DownloadModelRequest(version=version, path=entry.path, offset=offset)
        stream = self._models.DownloadModel(request, metadata=self._signed(DOWNLOAD_MODEL))
        position, overflow = offset, False
        try:
            try:
                first = next(stream)
            except StopIteration:
                raise ExportError(
                    f"the coordinator sent nothing for {version} {entry.path}"
                ) from None
            except grpc.RpcError as err:
                raise self._error(err, DOWNLOAD_MODEL) from None
            header = first.header
            if not first.HasField("header") or header.offset != offset:
                raise ExportError(
                    f"the coordinator's answer for {version} {entry.path} has no valid header: "
                    "it does not speak this fedlora's protocol"
                )
            if header.size_bytes != entry.size_bytes or header.sha256 != entry.sha256:
                raise ExportError(
                    f"{version} {entry.path} changed on the coordinator during the download: "
                    "run it again"
                )
            if offset and header.prefix_sha256 != sha256_file(part):
                part.unlink()
                raise _Restart
            with part.open("ab") as f:
                try:
                    for response in stream:
                        chunk = response.chunk
                        if not response.HasField("chunk") or chunk.offset != position:
                            raise ExportError(
                                f"the coordinator sent {version} {entry.path} out of order "
                                f"(expected byte {position}): run the download again"
                            )
                        if position + len(chunk.data) > entry.size_bytes:
                            overflow = True
                            break
                        f.write(chunk.data)
                        position += len(chunk.data)
                except grpc.RpcError as err:
                    details = err.details() or err.code().name
                    raise ExportError(
                        f"download of {version} {entry.path} stopped at byte {position} of "
                        f"{entry.size_bytes} ({details}): nothing was installed; run it again "
                        "to resume"
                    ) from None
                finally:
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            stream.cancel()
        if overflow:  # cannot come from the file the coordinator listed
            part.unlink()
            raise ExportError(
                f"the coordinator sent more of {version} {entry.path} than its "
                f"{entry.size_bytes} bytes: nothing was installed; download it again"
            )
        if position < entry.size_bytes:
            raise ExportError(
                f"download of {version} {entry.path} stopped at byte {position} of "
                f"{entry.size_bytes}: nothing was installed; run it again to resume"
            )
