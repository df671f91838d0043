"""Calibrated σ shared by the processes of one simulation: one small JSON file per answer.

A simulated fleet's devices calibrate in Ray workers, and the calibration prefetch
(:mod:`fedlora.simprefetch`) calibrates the same questions ahead of them in a process of
its own. :func:`fedlora.privacy.calibrate.calibrate_noise_multiplier` looks a question up
here before searching and files its answer after, so whichever process asks first
does the work and the others read the very float it found (the search is deterministic:
the same arguments give the same σ in any process).

A question is the calibration's full argument list (target ε, δ, q, steps, rounds, the
history's mechanisms, accountant, rtol, largest σ) and :data:`SEARCH_VERSION`, written
with ``repr`` (exact for floats). A file is named by the question's SHA-256 and holds
the question itself, which is compared on every read, and σ. Writes go to a temporary
file renamed into place, so a reader sees a whole answer or none; anything unreadable,
for another question, or not a finite σ > 0 is a miss, never an error.

Trust: the directory is created by the simulation for its run (mode 0700, removed
after) and named to its workers in :data:`ENV`. Only a simulated device consults it; a
deployed device (``fedlora device``) always calibrates for itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

ENV = "FEDLORA_CALIBRATION_CACHE"
"""The directory a simulation's workers share answers in (set for them by the simulation)."""

SEARCH_VERSION = 1
"""Part of every question: bump it when the search or an accountant changes its answers."""


class SharedCalibrations:
    """Answers in ``directory`` (which must exist: it is never created from here)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    @classmethod
    def from_env(cls) -> SharedCalibrations | None:
        """The simulation's shared answers, if :data:`ENV` names an existing directory."""
        value = os.environ.get(ENV)
        if not value or not Path(value).is_dir():
            return None
        return cls(Path(value))

    @staticmethod
    def _question(key: tuple[Any, ...]) -> str:
        return repr((SEARCH_VERSION, *key))

    def _path(self, question: str) -> Path:
        return self.directory / (hashlib.sha256(question.encode()).hexdigest()[:40] + ".json")

    def get(self, key: tuple[Any, ...]) -> float | None:
        """σ filed for ``key``, or None."""
        question = self._question(key)
        try:
            entry = json.loads(self._path(question).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("question") != question:
            return None
        sigma = entry.get("sigma")
        if isinstance(sigma, bool) or not isinstance(sigma, float):
            return None
        return sigma if math.isfinite(sigma) and sigma > 0 else None

    def put(self, key: tuple[Any, ...], sigma: float) -> None:
        """File σ for ``key``; a directory that cannot be written to is left alone."""
        question = self._question(key)
        text = json.dumps({"question": question, "sigma": float(sigma)})
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".tmp")
        except OSError:
            return
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self._path(question))
        except OSError:
            Path(tmp).unlink(missing_ok=True)
