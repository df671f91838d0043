"""Processes that die with the fedlora process supervising them.

``fedlora coordinator`` and ``fedlora device`` start Flower processes, which
start more (SuperExec, one ``flwr-serverapp`` per run, one ``flwr-clientapp``
per message), some in sessions of their own. If the supervisor is killed
outright (SIGKILL, OOM), nothing it could run on the way out would reach those.
So the supervisor puts its pid in the environment every descendant inherits,
and fedlora's apps, when they start inside such a process, watch it and exit
as soon as it is gone: no run keeps going without the coordinator or device
that started it.

The supervisors' side lives here too: finding Flower's console scripts, the
children's PATH, ``PR_SET_PDEATHSIG``, and stopping a child with everything
below it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedlora.errors import FedloraError

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


def flower_executable(name: str) -> str:
    """A Flower console script installed next to this Python (then on PATH)."""
    import shutil

    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FedloraError(f"{name} is not installed; reinstall fedlora (it needs flwr)")
    return found


def flower_path() -> str:
    """PATH with the directory of the Flower console scripts first (an unactivated venv)."""
    here = str(Path(flower_executable("flower-superlink")).parent)
    return os.pathsep.join([here, os.environ.get("PATH", "")])


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the process that started it dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; always reaps; then every descendant.

    Flower detaches some of its processes (SuperExec, the apps) into sessions of
    their own, so they are collected by parentage before the child goes.
    """
    below = descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in below:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
