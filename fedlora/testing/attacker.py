"""An attacker's Flower App Bundle, for the tests that show it never runs (tests/e2e).

:func:`evil_fab` builds a bundle the way ``flwr build`` does, carrying its own
``ServerApp`` and ``ClientApp`` modules. Importing either writes a marker file
under ``marker_dir`` (``serverapp-<pid>`` / ``clientapp-<pid>``), so a test can
assert that no process anywhere imported them. The ServerApp, if it ever ran,
would send a query to every connected node and write the replies (and their
error reasons) to ``marker_dir/replies.json``.

:func:`submit_to_control_api` submits a bundle to a SuperLink's Control API the
way ``flwr run`` does, with nothing but a CA certificate (``None``: plaintext).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_SERVER = """
import json, os, pathlib, time
pathlib.Path({marker!r}, f"serverapp-{{os.getpid()}}").write_text("imported")
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    deadline = time.monotonic() + 60
    nodes = []
    while not nodes and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    messages = [
        Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout={timeout}))
    out = [
        {{"node": r.metadata.src_node_id,
          "error": r.error.reason if r.has_error() else None}}
        for r in replies
    ]
    pathlib.Path({marker!r}, "replies.json").write_text(json.dumps(out))
"""

_CLIENT = """
import os, pathlib
pathlib.Path({marker!r}, f"clientapp-{{os.getpid()}}").write_text("imported")
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg, context):
    return msg.create_reply(msg.content)
"""

_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "{publisher}"

[tool.flwr.app.components]
serverapp = "{server_ref}"
clientapp = "{client_ref}"

[tool.flwr.app.config]
run-dir = ""
fedlora-config = ""
fedlora-config-json = ""
resume = ""
"""


def evil_fab(marker_dir: Path, *, shadow: bool = False, reply_timeout_s: float = 60) -> bytes:
    """An attacker's bundle whose modules mark their import under ``marker_dir``.

    ``shadow=False``: it names its own modules (``evil_server:app``/``evil_client:app``).
    ``shadow=True``: it names fedlora's components and carries ``fedlora/server/app.py``
    and ``fedlora/client/app.py`` to shadow the installed ones (Flower puts the bundle first on
    ``sys.path``), under fedlora's publisher name.
    """
    from flwr.cli.build import build_fab_from_files

    server = _SERVER.format(marker=str(marker_dir), timeout=reply_timeout_s).encode()
    client = _CLIENT.format(marker=str(marker_dir)).encode()
    if shadow:
        pyproject = _PYPROJECT.format(
            name="fedlora",
            publisher="fedlora",
            server_ref="fedlora.server.app:app",
            client_ref="fedlora.client.app:app",
        )
        files = {
            # a regular package: it comes first on sys.path, so it shadows the real one
            "fedlora/__init__.py": b"",
            "fedlora/server/__init__.py": b"",
            "fedlora/server/app.py": server,
            "fedlora/client/__init__.py": b"",
            "fedlora/client/app.py": client,
        }
    else:
        pyproject = _PYPROJECT.format(
            name="helpful-app",
            publisher="mallory",
            server_ref="evil_server:app",
            client_ref="evil_client:app",
        )
        files = {"evil_server.py": server, "evil_client.py": client}
    return build_fab_from_files({"pyproject.toml": pyproject.encode(), **files})[0]


def submit_to_control_api(address: str, fab_bytes: bytes, root_cert: Path | None) -> int:
    """StartRun on a Control API as ``flwr run`` does it; returns the run id (0: refused)."""
    from flwr.common.serde import fab_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    from fedlora.server.control import control_client

    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    with control_client(address, root_cert, insecure=root_cert is None) as client:
        res = client.StartRun(StartRunRequest(fab=fab_to_proto(fab)))
    return int(res.run_id) if res.HasField("run_id") else 0


def markers(marker_dir: Path) -> list[str]:
    """The attacker modules that were imported somewhere (their marker files)."""
    return sorted(p.name for p in marker_dir.glob("*app-*"))
