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
    return save_tensors_atomic(
        directory / f"round-{server_round:04d}.safetensors",
        {n: np.ascontiguousarray(a) for n, a in zip(names, arrays, strict=True)},
        {"round": str(server_round), "names": json.dumps(list(names))},
    )


def save_tensors_atomic(
    target: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]
) -> Path:
    """Write a safetensors file by rename: a crash mid-write leaves no file under its name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_checkpoint(path: Path, names: Sequence[str]) -> list[np.ndarray]:
    tensors = load_file(str(path))
    return [tensors[n] for n in names]
