"""Talking to a SuperLink's Control API (HTTP): register devices, start runs, read them.

``fedlora coordinator`` registers device keys with the SuperLink it runs, and
its RunService (:mod:`server.service.runs`) starts, stops and follows runs on
it, through the same Control API client the ``flwr`` CLI uses. The Control API
has no authentication of its own, so the coordinator binds it to loopback
(:data:`CONTROL_HOST`) and nothing but the coordinator talks to it; operators
reach runs through the signed RunService. Flower keeps CLI credentials under
``FLWR_HOME``; fedlora points that at a directory of its own so it never reads
or writes a user's ``~/.flwr``.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.appguard import COMPONENTS, PUBLISHER
from fedlora.deploy_cli import DEFAULT_PORT
from fedlora.errors import ConfigError, FedloraError

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


@contextlib.contextmanager
def control_client(
    address: str, root_cert: Path | None, insecure: bool
) -> Iterator[Any]:  # ControlHttpClient
    """A Control API client for ``address`` (HOST:PORT), closed on exit."""
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    if "FLWR_HOME" not in os.environ:
        flwr_home(Path.home() / ".fedlora" / "flwr")
    conn = SuperLinkConnection(
        name="fedlora",
        address=address,
        root_certificates=None if insecure or root_cert is None else str(root_cert.resolve()),
        insecure=insecure,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # Flower prints "Using SuperLink: ..."
        client = init_http_client_from_connection(conn)
    try:
        yield client
    finally:
        client.close()


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


def describe_control_error(exc: BaseException) -> str:
    """One line for a failed Control API call (Flower raises click exceptions or httpx errors)."""
    msg = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return " ".join(str(msg).split())


def app_pyproject(version: str) -> str:
    """The run bundle's only file: which *installed* apps to run, and the run config keys.

    Devices and the coordinator refuse any other bundle (:func:`fedlora.appguard.check_fab`).
    """
    components = "\n".join(f'{k} = "{v}"' for k, v in COMPONENTS.items())
    return f"""[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "fedlora"
version = "{version}"
description = "fedlora federated LoRA fine-tuning (apps installed on coordinator and devices)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "{PUBLISHER}"

[tool.flwr.app.components]
{components}

[tool.flwr.app.config]
fedlora-config = ""
fedlora-config-json = ""
run-dir = ""
resume = ""
"""


def build_fab() -> bytes:
    """fedlora's run bundle: a ``pyproject.toml`` and Flower's manifest, no code."""
    from flwr.cli.build import build_fab_from_files

    from fedlora import __version__

    files = {"pyproject.toml": app_pyproject(__version__).encode()}
    return build_fab_from_files(files)[0]
