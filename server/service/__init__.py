"""The coordinator's own gRPC services: ModelService, PrivacyService, RunService; signed calls only.

``serve`` starts them on one port, with TLS from ``fedlora keys init`` and an
interceptor that authenticates every call (:mod:`fedlora.server.service.auth`) before a
servicer sees it. Released models come from the runs' export manifests
(:mod:`fedlora.server.service.models`), spent budgets from the runs' privacy ledgers
(:mod:`fedlora.server.service.privacy`); both are re-read from ``DIR`` as it changes, so
the coordinator needs no restart when a run finishes or a device is registered.
Runs are started, resumed, stopped and followed through the RunService
(:mod:`fedlora.server.service.runs`, operator key only), which talks to the SuperLink's
Control API on loopback.
Devices call it with :class:`fedlora.client.service_client.DeviceServiceClient`.
"""

from __future__ import annotations

import ipaddress
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from fedlora.errors import ConfigError
from fedlora.keys import TlsFiles
from fedlora.server.service.auth import Authenticator, AuthInterceptor, Caller, Unauthenticated
from fedlora.server.service.models import CHUNK_BYTES, ModelServicer, ReleasedModels, passed_gate
from fedlora.server.service.privacy import DeviceBudget, FleetLedgers, PrivacyServicer
from fedlora.server.service.runs import RunServicer
from fedlora.v1 import model_service_pb2_grpc, privacy_service_pb2_grpc, run_service_pb2_grpc

__all__ = [
    "CHUNK_BYTES",
    "AuthInterceptor",
    "Authenticator",
    "Caller",
    "DeviceBudget",
    "FleetLedgers",
    "ModelServicer",
    "PrivacyServicer",
    "ReleasedModels",
    "RunServicer",
    "ServiceServer",
    "Unauthenticated",
    "passed_gate",
    "serve",
]


class ServiceServer:
    """A started gRPC server and the port it is bound to (useful with ``port=0``).

    ``stop`` and ``wait_for_termination`` are ``grpc.Server``'s; the server itself
    is ``.server``.
    """

    def __init__(self, server: grpc.Server, host: str, port: int, tls: bool) -> None:
        self.server = server
        self.host = host
        self.port = port
        self.tls = tls

    @property
    def address(self) -> str:
        return f"{_host_for_address(self.host)}:{self.port}"

    def stop(self, grace: float | None = None) -> threading.Event:
        return self.server.stop(grace)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(self.server.wait_for_termination(timeout))

    def __enter__(self) -> ServiceServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(None).wait()


def _host_for_address(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def serve(
    data_dir: str | Path,
    host: str,
    port: int,
    tls: TlsFiles | None,
    *,
    model_servicer: Any = None,
    privacy_servicer: Any = None,
    control: str | None = None,
    max_workers: int = 16,
) -> ServiceServer:
    """Start ModelService and PrivacyService on ``host:port`` (0: a free port) and return it.

    With ``control`` (the SuperLink's Control API, ``127.0.0.1:PORT``) the RunService
    is served too, talking to it with ``tls``' CA.

    With ``tls`` the server presents the CA-signed certificate; without, it serves
    plaintext (local trials only), but calls are still signed and checked either
    way. ``model_servicer`` / ``privacy_servicer`` replace the default servicers,
    e.g. with a wrapper around them; their methods take ``(request, context, caller)``.
    """
    data = Path(data_dir)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fedlora-service"),
        interceptors=[AuthInterceptor(Authenticator(data))],
        # Without this, Linux lets a second server bind the same port and steal calls.
        options=[("grpc.so_reuseport", 0)],
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(
        model_servicer or ModelServicer(data), server
    )
    privacy_service_pb2_grpc.add_PrivacyServiceServicer_to_server(
        privacy_servicer or PrivacyServicer(data), server
    )
    if control is not None:
        run_service_pb2_grpc.add_RunServiceServicer_to_server(
            RunServicer(data, control, tls.ca if tls is not None else None), server
        )
    address = f"{_host_for_address(host)}:{port}"
    try:
        if tls is not None:
            _, cert, key = tls.read()
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=None)
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as err:  # grpc >= 1.60 raises where older versions returned 0
        raise ConfigError(f"cannot listen on {address}: {err}") from None
    if not bound:
        raise ConfigError(f"cannot listen on {address}: the port is in use or the host not local")
    server.start()
    return ServiceServer(server, host, bound, tls is not None)
