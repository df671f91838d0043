"""``DIR/audit.jsonl``: who started, stopped or resumed a run and registered or revoked a key.

The coordinator's data directory keeps one append-only event log. Each event is one
line of JSON::

    {"seq": 3, "time": "2025-05-01T12:00:00.123+00:00", "unix": 1746100800.123,
     "action": "key.register", "actor": "local:alice@coord (filesystem)",
     "details": {"device_id": "phone-17", "fingerprint": "sha256:…"}, "prev": "…"}

``actor`` is who authorised the action: for a call to the coordinator's RunService,
the signed caller and the fingerprint of its key (``operator (key sha256:…)``); for
``fedlora keys register`` / ``revoke``, which change ``DIR``'s files directly on the
coordinator's machine, the local OS user (:func:`local_actor`). ``prev`` is the
SHA-256 of the previous line's bytes (64 zeros for the first), so editing or
removing a line breaks the chain at the line after it; :func:`read_events` checks
the whole chain. The chain cannot show that the *last* lines were cut off or the
last line edited: keep a copy of the latest line (its hash) elsewhere to detect that.

Appends are one ``write`` on an ``O_APPEND`` descriptor under an exclusive ``flock``
(the previous line is read under the same lock), then ``fsync``: events from several
processes never interleave and every one is on disk before the action is reported.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError

AUDIT_LOG = "audit.jsonl"
"""The log's file name in the coordinator's data directory: ``DIR/audit.jsonl``."""

ACTIONS = frozenset({"run.start", "run.resume", "run.stop", "key.register", "key.revoke"})
GENESIS = "0" * 64
"""``prev`` of the first line."""
_FIELDS = ("seq", "time", "unix", "action", "actor", "details", "prev")
_TAIL_CHUNK = 4096


def log_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / AUDIT_LOG


def line_hash(line: bytes) -> str:
    """What the next line's ``prev`` must be: SHA-256 hex of ``line`` without its newline."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def local_actor() -> str:
    """``local:<os user>@<hostname> (filesystem)``: who changed DIR's files on this machine."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no passwd entry and no $USER
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"local:{user}@{socket.gethostname()} (filesystem)"


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: one writer at a time is the operator's job
        return
    fcntl.flock(fd, fcntl.LOCK_EX)


def _count_lines(fd: int) -> int:
    os.lseek(fd, 0, os.SEEK_SET)
    lines = 0
    while chunk := os.read(fd, 1 << 16):
        lines += chunk.count(b"\n")
    return lines


def _refuse_append(path: Path, number: int, why: str) -> ConfigError:
    return ConfigError(
        f"{path}: line {number} {why}: nothing more is logged until the operator moves the "
        "log aside (keep it as evidence)"
    )


def _chain_tail(fd: int, path: Path) -> tuple[str, int]:
    """(``prev``, ``seq``) for the next event: from the log's last line, read from the end."""
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        return GENESIS, 0
    tail, pos = b"", size
    while pos > 0 and tail.count(b"\n") < 2:
        step = min(_TAIL_CHUNK, pos)
        pos -= step
        tail = os.pread(fd, step, pos) + tail
    if not tail.endswith(b"\n"):
        raise _refuse_append(path, _count_lines(fd) + 1, "is incomplete (a write was cut off)")
    last = tail[:-1].rsplit(b"\n", 1)[-1]
    try:
        seq = json.loads(last)["seq"]
    except (ValueError, KeyError, TypeError):
        seq = None
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise _refuse_append(path, _count_lines(fd), "is not an audit event")
    return line_hash(last), seq


def append_event(
    data_dir: str | os.PathLike[str], action: str, actor: str, **details: Any
) -> dict[str, Any]:
    """Append one event to ``DIR/audit.jsonl`` and return it as written.

    ``action`` is one of :data:`ACTIONS` (else :class:`ValueError`), ``actor`` who
    authorised it, ``details`` JSON values (else :class:`TypeError`). The event is on
    disk when this returns; a log that cannot be appended to is a :class:`ConfigError`.
    """
    if action not in ACTIONS:
        raise ValueError(f"audit action {action!r} is not one of {', '.join(sorted(ACTIONS))}")
    if not isinstance(actor, str) or not actor.strip() or "\n" in actor:
        raise ValueError(f"audit actor {actor!r} must be a non-empty single line")
    json.dumps(details)  # TypeError now, before the file is touched
    path = log_path(data_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError(f"cannot open audit log {path}: {err.strerror or err}") from None
    try:
        _lock(fd)
        prev, seq = _chain_tail(fd, path)
        ms = round(time.time() * 1000)  # both forms of the time from one reading, to the ms
        stamp = datetime.fromtimestamp(ms // 1000, timezone.utc).replace(
            microsecond=ms % 1000 * 1000
        )
        event = {
            "seq": seq + 1,
            "time": stamp.isoformat(timespec="milliseconds"),
            "unix": ms / 1000,
            "action": action,
            "actor": actor,
            "details": details,
            "prev": prev,
        }
        line = json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        data = line.encode("ascii") + b"\n"
        try:
            if os.write(fd, data) != len(data):
                raise OSError(f"short write to {path}")
            os.fsync(fd)
        except OSError as err:
            raise ConfigError(
                f"cannot append to audit log {path}: {getattr(err, 'strerror', None) or err}"
            ) from None
    finally:
        os.close(fd)  # releases the lock
    if created:
        _fsync_dir(path.parent)
    return event


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _broken(path: Path, number: int, why: str) -> ConfigError:
    return ConfigError(
        f"{path}: audit log broken at line {number}: {why}; the log was altered, keep it as "
        "evidence and restore it from backup"
    )


def read_events(data_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every event in ``DIR/audit.jsonl``, oldest first ([] if there is none yet).

    The hash chain is checked: a line that is not an event, out of sequence, or whose
    ``prev`` is not the hash of the line before it is a :class:`ConfigError` naming
    the first such line.
    """
    path = log_path(data_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise ConfigError(f"cannot read audit log {path}: {err.strerror or err}") from None
    events: list[dict[str, Any]] = []
    prev = GENESIS
    lines = data.split(b"\n")
    if lines[-1]:
        raise _broken(path, len(lines), "the line is incomplete (a write was cut off)")
    for number, line in enumerate(lines[:-1], 1):
        try:
            event = json.loads(line)
        except ValueError:
            raise _broken(path, number, "the line is not JSON") from None
        if not isinstance(event, dict) or set(event) != set(_FIELDS):
            raise _broken(path, number, f"an event has exactly the fields {', '.join(_FIELDS)}")
        if not isinstance(event["action"], str) or event["action"] not in ACTIONS:
            raise _broken(path, number, f"unknown action {event['action']!r}")
        if not isinstance(event["details"], dict):
            raise _broken(path, number, "its details are not an object")
        if event["prev"] != prev:
            raise _broken(
                path,
                number,
                f"it does not follow line {number - 1}: that line was edited or lines "
                "before this one were removed"
                if number > 1
                else "the first line does not start the chain: lines before it were removed",
            )
        if event["seq"] != number:
            raise _broken(path, number, f"it is event {event['seq']!r}, not event {number}")
        events.append(event)
        prev = line_hash(line)
    return events


def format_event(event: dict[str, Any]) -> str:
    """One line for a person: time, action, actor, then the details as key=value."""
    details = " ".join(f"{k}={v}" for k, v in sorted(event["details"].items()))
    return f"{event['time']}  {event['action']:<12}  {event['actor']}  {details}".rstrip()
