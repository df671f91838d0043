"""What every run directory's writers share: atomic writes, the run format, package versions.

Atomic writes: a reader sees the old file or the new one, never half of one (the
privacy ledger, ``run.json``, ``state.json`` and the metrics all go through here).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fedlora import __version__

#: ``run.json``'s format tag.
RUN_FORMAT = "fedlora.run"


def write_json_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file in the same directory.

    The temporary file is fsynced and then ``os.replace``-d over ``path`` (atomic
    on POSIX and Windows within one filesystem); the directory is fsynced where
    the platform allows so the rename itself survives a crash. On any error the
    temporary file is removed and ``path`` is left as it was.
    """
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n", path)


def write_text_atomic(text: str, path: str | os.PathLike[str]) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (as :func:`write_json_atomic`)."""
    write_bytes_atomic(text.encode("utf-8"), path)


def write_bytes_atomic(
    data: bytes, path: str | os.PathLike[str], *, mode: int | None = None
) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file in the same directory.

    ``mode`` sets the file's permissions before any byte is written (key files are
    0600 from the start). The directory is fsynced after the rename; on any error
    the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            if mode is not None:
                os.fchmod(tmp.fileno(), mode)
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, atomically (NaN allowed: summaries may hold one)."""
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def versions() -> dict[str, str]:
    """The versions of what a run ran on (recorded in ``config.json`` and ``run.json``)."""
    import platform

    import flwr
    import opacus
    import peft
    import torch
    import transformers

    return {
        "fedlora": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "opacus": opacus.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
    }
