"""Where a coordinator listens: its three ports from ``HOST[:P]``, and local port helpers.

A coordinator uses three consecutive ports from ``--port P`` (default
:data:`DEFAULT_PORT`): P = Flower Fleet API (gRPC, devices), P+1 = Flower
Control API (HTTP, on the coordinator's loopback only: :data:`CONTROL_HOST`),
P+2 = fedlora's ModelService / PrivacyService / RunService (gRPC). Every command
takes the coordinator as ``HOST[:P]`` and derives the rest. Shared by the
coordinator, the devices and the commands, so none of them imports another.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError, FedloraError

DEFAULT_PORT = 9092

#: The only interface the SuperLink's Control API (port P+1) ever listens on.
CONTROL_HOST = "127.0.0.1"


@dataclass(frozen=True)
class CoordinatorAddress:
    """A coordinator's three endpoints, derived from ``HOST[:P]``."""

    host: str
    port: int = DEFAULT_PORT

    @classmethod
    def parse(cls, text: str) -> CoordinatorAddress:
        text = text.strip()
        if text.startswith("["):  # [IPv6] or [IPv6]:PORT
            host, _, rest = text[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
            if rest and not rest.startswith(":"):
                host = ""
        elif text.count(":") > 1:  # a bare IPv6 address, no port
            host, port = text, ""
        else:
            host, _, port = text.partition(":")
        if not host or (port and (not port.isdigit() or not 0 < int(port) < 65534)):
            raise ConfigError(f"coordinator address {text!r} is not HOST, HOST:PORT or [IPv6]:PORT")
        return cls(host, int(port) if port else DEFAULT_PORT)

    @property
    def local(self) -> CoordinatorAddress:
        """The address this machine dials to reach a coordinator listening on ``host``.

        A coordinator bound to every interface (0.0.0.0, ::) is reached on loopback,
        which its certificate names (``fedlora keys init`` puts localhost and
        127.0.0.1 in it).
        """
        if self.host in ("", "0.0.0.0", "::"):
            return CoordinatorAddress("127.0.0.1", self.port)
        return self

    def _join(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{port}"

    @property
    def fleet(self) -> str:
        """Flower Fleet API (gRPC): what devices connect to."""
        return self._join(self.port)

    @property
    def control(self) -> str:
        """Flower Control API (HTTP): on the coordinator's loopback only (:data:`CONTROL_HOST`)."""
        return f"{CONTROL_HOST}:{self.port + 1}"

    @property
    def service(self) -> str:
        """fedlora's ModelService / PrivacyService / RunService (gRPC)."""
        return self._join(self.port + 2)


def flwr_home(path: Path) -> None:
    """Give the Flower client code a home of its own (credentials, installed apps)."""
    path.mkdir(parents=True, exist_ok=True)
    os.environ["FLWR_HOME"] = str(path)


def wait_for_port(host: str, port: int, timeout_s: float, alive: Any = None) -> None:
    """Block until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise FedloraError(f"the process that should listen on {host}:{port} exited")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.2)
    raise FedloraError(f"nothing listens on {host}:{port} after {timeout_s:.0f}s")


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host if host not in ("", "0.0.0.0") else "0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def coordinator_ca(root_cert: str | None, insecure: bool) -> Path | None:
    """The coordinator's CA certificate from ``--root-cert`` (None with ``--insecure``).

    :class:`ConfigError` in one line when it is missing or not a file.
    """
    if insecure:
        return None
    if not root_cert:
        raise ConfigError(
            "--root-cert CA is required (the coordinator's DIR/tls/ca.crt); "
            "--insecure only for local trials"
        )
    ca = Path(root_cert)
    if not ca.is_file():
        raise ConfigError(f"CA certificate {ca} does not exist")
    return ca
