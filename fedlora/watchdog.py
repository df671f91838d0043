"""Processes that die with the fedlora process supervising them.

``fedlora coordinator`` and ``fedlora device`` start Flower processes, which
start more (SuperExec, one ``flwr-serverapp`` per run, one ``flwr-clientapp``
per message), some in sessions of their own. If the supervisor is killed
outright (SIGKILL, OOM), nothing it could run on the way out would reach those.
So the supervisor puts its pid in the environment every descendant inherits,
and fedlora's apps, when they start inside such a process, watch it and exit
as soon as it is gone: no run keeps going without the coordinator or device
that started it.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

SUPERVISOR_ENV = "FEDLORA_SUPERVISOR_PID"
_started = False
_lock = threading.Lock()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def watch_supervisor(interval_s: float = 1.0) -> None:
    """Exit this process (status 3) once its fedlora supervisor has died; idempotent."""
    global _started
    raw = os.environ.get(SUPERVISOR_ENV)
    if not raw or not raw.isdigit():
        return
    pid = int(raw)
    with _lock:
        if _started:
            return
        _started = True

    def loop() -> None:
        while alive(pid):
            time.sleep(interval_s)
        os._exit(3)

    threading.Thread(target=loop, name="fedlora-supervisor-watch", daemon=True).start()


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc), children before grandchildren."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        parents[int(entry.name)] = int(fields[1])
    out: list[int] = []
    frontier = [pid]
    while frontier:
        nxt = [child for child, parent in parents.items() if parent in frontier]
        out.extend(nxt)
        frontier = nxt
    return out
