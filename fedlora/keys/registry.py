"""``DIR/registry/devices.json``: which devices may call the coordinator, and with which key.

Each entry maps a device id to its OpenSSH public key, the key's ``SHA256:``
fingerprint (as ``ssh-keygen -l`` prints it) and when it was registered. The
coordinator reads it on every call (re-parsing only when the file changed), so
``fedlora keys register`` and ``revoke`` take effect while it runs.

Every change is also an event in ``DIR/audit.jsonl`` (:mod:`fedlora.auditlog`),
appended under the registry's lock once the change is saved, so the log's order is
the registry's. A register that changes nothing logs nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.auditlog import append_event, local_actor
from fedlora.errors import ConfigError
from fedlora.keys.material import (
    check_device_id,
    check_nist_ec,
    flower_public_key_bytes,
    key_fingerprint,
    openssh_public_key,
    parse_public_key,
    ssh_fingerprint,
    write_atomic,
)
from fedlora.keys.signing import OPERATOR_ID

REGISTRY_FILE = Path("registry") / "devices.json"
REGISTRY_FORMAT = "fedlora.device-registry"
REGISTRY_VERSION = 1


@dataclass(frozen=True)
class RegisteredDevice:
    """One registry entry: who the device is and the key its calls must be signed with."""

    device_id: str
    public_key: str  # one OpenSSH line, no comment
    fingerprint: str  # SHA256:<base64>, as ssh-keygen -l prints it
    registered_at: str  # ISO 8601, UTC

    def key(self) -> ec.EllipticCurvePublicKey:
        return parse_public_key(self.public_key, f"registry entry {self.device_id}")

    def flower_public_key(self) -> bytes:
        """What to send in Flower's ``RegisterNodeRequest(public_key=...)``."""
        return flower_public_key_bytes(self.key())

    def to_dict(self) -> dict[str, str]:
        return {
            "public_key": self.public_key,
            "fingerprint": self.fingerprint,
            "registered_at": self.registered_at,
        }

    def audit_details(self) -> dict[str, str]:
        """What the audit log records about this device's key."""
        return {
            "device_id": self.device_id,
            "fingerprint": key_fingerprint(self.key()),
            "ssh_fingerprint": self.fingerprint,
        }


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class DeviceRegistry:
    """``DIR/registry/devices.json``: the devices allowed to call the coordinator.

    Reads are cheap and always current: the file is re-read whenever it changed on
    disk (devices are registered by ``fedlora keys register`` while the coordinator
    runs). Changes are read-modify-write under an exclusive lock and saved atomically.
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / REGISTRY_FILE
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._devices: dict[str, RegisteredDevice] = {}

    # -------------------------------------------------------------- reading
    def _read(self) -> dict[str, RegisteredDevice]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ConfigError(f"cannot read device registry {self.path}: {err}") from None
        if (
            not isinstance(data, dict)
            or data.get("format") != REGISTRY_FORMAT
            or data.get("version") != REGISTRY_VERSION
            or not isinstance(data.get("devices"), dict)
        ):
            raise ConfigError(
                f"{self.path} is not a version-{REGISTRY_VERSION} {REGISTRY_FORMAT}: "
                "restore it from backup"
            )
        devices = {}
        for device_id, entry in data["devices"].items():
            try:
                device = RegisteredDevice(
                    device_id=check_device_id(device_id),
                    public_key=str(entry["public_key"]),
                    fingerprint=str(entry["fingerprint"]),
                    registered_at=str(entry["registered_at"]),
                )
                device.key()  # a broken entry is refused now, not at the device's next call
            except (KeyError, TypeError, ConfigError) as err:
                raise ConfigError(
                    f"{self.path}: entry {device_id!r} is malformed ({err})"
                ) from None
            devices[device_id] = device
        return devices

    def devices(self) -> dict[str, RegisteredDevice]:
        """Every registered device by id, as the file says now."""
        try:
            st = self.path.stat()
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp or stamp is None:
                self._devices = self._read() if stamp is not None else {}
                self._stamp = stamp
            return dict(self._devices)

    def get(self, device_id: str) -> RegisteredDevice | None:
        return self.devices().get(device_id)

    def by_public_key(self, public_key: bytes | str) -> RegisteredDevice | None:
        """The device registered with this key (PEM as Flower stores it, OpenSSH or DER)."""
        wanted = _spki(parse_public_key(public_key))
        for device in self.devices().values():
            if _spki(device.key()) == wanted:
                return device
        return None

    # -------------------------------------------------------------- changing
    @contextlib.contextmanager
    def _changing(self) -> Iterator[dict[str, RegisteredDevice]]:
        """The devices as saved now, under an exclusive lock held until the block ends
        (the block saves its change with :meth:`_save`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        with lock_path.open("a") as lock:
            try:
                import fcntl
            except ImportError:  # not POSIX: one writer at a time is the operator's job
                fcntl = None  # type: ignore[assignment]
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            yield self._read()

    def _save(self, devices: dict[str, RegisteredDevice]) -> None:
        payload: dict[str, Any] = {
            "format": REGISTRY_FORMAT,
            "version": REGISTRY_VERSION,
            "devices": {d: devices[d].to_dict() for d in sorted(devices)},
        }
        text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
        write_atomic(self.path, text.encode("utf-8"), 0o644)

    def register(
        self,
        device_id: str,
        public_key: ec.EllipticCurvePublicKey | bytes | str,
        *,
        source: str = "public key",
        actor: str | None = None,
    ) -> RegisteredDevice:
        """Allow ``device_id`` to call with ``public_key``; the same pair again is a no-op.

        Refused: a reserved or malformed id, a key that is not NIST EC, an id already
        registered with another key, a key already registered under another id. A new
        registration is logged as ``key.register`` by ``actor`` (default: this machine's
        user, :func:`fedlora.auditlog.local_actor`).
        """
        check_device_id(device_id)
        if device_id == OPERATOR_ID:
            raise ConfigError(f"device id {OPERATOR_ID!r} is reserved for the operator key")
        key = (
            public_key
            if isinstance(public_key, ec.EllipticCurvePublicKey)
            else parse_public_key(public_key, source)
        )
        check_nist_ec(key, source)
        line, fp = openssh_public_key(key), ssh_fingerprint(key)
        with self._changing() as devices:
            known = devices.get(device_id)
            if known is not None:
                if known.public_key == line:
                    return known
                raise ConfigError(
                    f"device {device_id} is already registered with another key "
                    f"({known.fingerprint}, not {fp}): revoke it first with "
                    f"`fedlora keys revoke --data-dir "
                    f"{self.data_dir} --device-id {device_id}`"
                )
            for other in devices.values():
                if other.public_key == line:
                    raise ConfigError(
                        f"key {fp} is already registered as device {other.device_id}: every "
                        "device needs its own key (fedlora keys device)"
                    )
            now = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
            device = RegisteredDevice(device_id, line, fp, now)
            devices[device_id] = device
            self._save(devices)
            self._audit("key.register", actor, device)
        return device

    def revoke(self, device_id: str, *, actor: str | None = None) -> RegisteredDevice:
        """Remove ``device_id``; its calls are refused from the next one on. Logged as
        ``key.revoke`` by ``actor`` (default: this machine's user)."""
        with self._changing() as devices:
            if device_id not in devices:
                known = ", ".join(sorted(devices)) or "none"
                raise ConfigError(
                    f"device {device_id!r} is not registered in {self.path} (registered: {known})"
                )
            device = devices.pop(device_id)
            self._save(devices)
            self._audit("key.revoke", actor, device)
        return device

    def _audit(self, action: str, actor: str | None, device: RegisteredDevice) -> None:
        try:
            append_event(self.data_dir, action, actor or local_actor(), **device.audit_details())
        except ConfigError as err:
            done = "registered" if action == "key.register" else "revoked"
            raise ConfigError(
                f"device {device.device_id} is {done}, but the audit log did not record it: {err}"
            ) from None
