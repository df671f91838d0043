"""Talking to a SuperLink's Control API (HTTP): register devices, start runs, read them.

``fedlora coordinator`` registers device keys with the SuperLink it runs, and
its RunService (:mod:`fedlora.server.service.runs`) starts, stops and follows runs on
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedlora.addresses import flwr_home
from fedlora.appguard import COMPONENTS, PUBLISHER


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
