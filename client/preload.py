"""Simulation workers import the device runtime's libraries as soon as they start.

A simulated fleet's worker (one Ray actor a core) spends about 3 s of its first
messages importing torch (0.75 s), fedlora's device client (1.1 s) and transformers'
modelling code, peft and Opacus (1.2 s): 1.4 s in its first discovery reply and the
rest in the background model build (:func:`fedlora.runtime.warm_up`), which round 1's
first training request then waits for (1.2 s of the default run's 5.0-s round 1,
2026-12-03). Ray starts its workers while the coordinator is still importing and
building its own model, so :func:`start`, Ray's ``worker_process_setup_hook``
(:func:`fedlora.simulate.with_preload`), imports them there, in a daemon thread:
round 1 went from 5.8-5.9 to 4.5-4.6 s (``bench/efficiency.py``, side by side).

Two threads importing the same packages at once can trip Python's import deadlock
detection, so the ClientApp waits for this thread (:func:`wait`) before it imports
anything itself; the preload is then the only importer while it runs. An import that
fails here is left for the message that needs it, which imports it again and reports
the error in its reply. A process that never called :func:`start` (a deployed device,
the tests) does not wait for anything.
"""

from __future__ import annotations

import importlib
import threading

MODULES = (
    "torch",
    "fedlora.client.device_client",
    "transformers.modeling_utils",
    "peft",
    "opacus",
)
"""What a device's first training request needs, heaviest first (measured above)."""

_thread: threading.Thread | None = None
_lock = threading.Lock()


def _import_all() -> None:
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception:
            continue  # the message that needs it imports it again and says why


def start() -> None:
    """Start importing :data:`MODULES` in a daemon thread, once per process."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_import_all, name="fedlora-preload", daemon=True)
            _thread.start()


def wait() -> None:
    """Return once the preload (if this process started one) has finished."""
    thread = _thread
    if thread is not None:
        thread.join()
