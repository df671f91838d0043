"""Fixtures: a coordinator data dir with real keys, exports and ledgers, and real TLS servers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fedlora.client.service_client import DeviceServiceClient
from fedlora.keys import DeviceRegistry, generate_device_key, init_pki, tls_files
from fedlora.server.service import ServiceServer, serve
from tests.service.helpers import event, touch_later, write_export, write_run


@dataclass
class Coordinator:
    data_dir: Path
    keys_dir: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def ca(self) -> Path:
        return self.data_dir / "tls" / "ca.crt"

    def key(self, device_id: str) -> Path:
        if device_id == "operator":
            return self.data_dir / "tls" / "operator.key"
        return self.keys_dir / f"{device_id}.key"


@pytest.fixture
def coordinator(tmp_path: Path) -> Coordinator:
    """Registered devices d1 and d2, an unregistered 'stranger'; run-a has an export and a
    ledger (d1 twice, d2 once), run-b (later, budget 4) a ledger with d1 once more."""
    data_dir, keys_dir = tmp_path / "coordinator", tmp_path / "device-keys"
    init_pki(data_dir)
    registry = DeviceRegistry(data_dir)
    for device_id in ("d1", "d2", "stranger"):
        _, pub = generate_device_key(keys_dir, device_id)
        if device_id != "stranger":
            registry.register(device_id, pub.read_bytes())
    manifest = write_export(data_dir / "runs" / "run-a")
    write_run(
        data_dir / "runs" / "run-a",
        [event("d1", 1), event("d2", 1, sigma=0.9), event("d1", 2)],
        epsilon=3.0,
    )
    write_run(data_dir / "runs" / "run-b", [event("d1", 1, sigma=1.5, steps=20)], epsilon=4.0)
    touch_later(data_dir / "runs" / "run-b" / "privacy" / "ledger.json", 60)
    return Coordinator(data_dir, keys_dir, manifest)


@contextlib.contextmanager
def running(data_dir: Path, **kwargs: Any) -> Iterator[ServiceServer]:
    """A TLS server on a free 127.0.0.1 port, stopped however the test ends."""
    server = serve(data_dir, "127.0.0.1", 0, tls_files(data_dir), **kwargs)
    try:
        yield server
    finally:
        server.stop(None).wait()


@pytest.fixture
def server(coordinator: Coordinator) -> Iterator[ServiceServer]:
    with running(coordinator.data_dir) as srv:
        yield srv


@pytest.fixture
def connect(coordinator: Coordinator) -> Iterator[Any]:
    """``connect(server, device_id="d1", key=None)`` → a TLS client; all closed at the end."""
    clients: list[DeviceServiceClient] = []

    def make(
        server: ServiceServer, device_id: str = "d1", key: Path | None = None
    ) -> DeviceServiceClient:
        client = DeviceServiceClient(
            f"127.0.0.1:{server.port}",
            coordinator.ca,
            device_id,
            key or coordinator.key(device_id),
            timeout=10,
        )
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            client.close()
