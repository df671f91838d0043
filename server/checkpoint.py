"""Per-round checkpoints of the global adapter (safetensors, written atomically)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def save_checkpoint(
    directory: Path, server_round: int, names: Sequence[str], arrays: Sequence[np.ndarray]
) -> Path:
    """Write ``round-NNNN.safetensors``; a crash mid-write leaves no file under that name."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"round-{server_round:04d}.safetensors"
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    try:
        save_file(
            {n: np.ascontiguousarray(a) for n, a in zip(names, arrays, strict=True)},
            tmp,
            metadata={"round": str(server_round), "names": json.dumps(list(names))},
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_checkpoint(path: Path, names: Sequence[str]) -> list[np.ndarray]:
    tensors = load_file(str(path))
    return [tensors[n] for n in names]
