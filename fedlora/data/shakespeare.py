"""Plays as a fleet: every speaking role is a device (the LEAF Shakespeare setup).

The input is the tinyshakespeare layout: blocks separated by blank lines, each
starting with a ``Role:`` line followed by the speech. One speech is one
record (``device`` and ``label`` = the role), so roles with many lines are big
devices and the split is naturally non-IID.

:func:`fedlora.data.fleet.build_fleet` reads a file this way when
:func:`looks_like_play` says so. The product never needs the file; tests use
:func:`find_shakespeare` to find the copy next to the repository when present.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedlora.data.records import Record
from fedlora.errors import DataError

_ROLE = re.compile(r"^[A-Za-z][A-Za-z' .,&-]{0,40}:$")
_BLOCK_BREAK = re.compile(r"\n[ \t]*\n+")
_SNIFF_BLOCKS = 20
_REPO_ROOT = Path(__file__).resolve().parents[2]


def find_shakespeare() -> Path | None:
    """``../shared/data/tinyshakespeare.txt`` beside the repository, if it is there."""
    candidate = _REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    return candidate if candidate.is_file() else None


def looks_like_play(path: str | Path) -> bool:
    """True when most of the first blocks of a text file start with a ``Role:`` line."""
    path = Path(path)
    if not path.is_file() or path.suffix not in ("", ".txt"):
        return False
    try:
        with path.open(encoding="utf-8") as f:
            head = f.read(16_384)
    except (OSError, UnicodeDecodeError):
        return False
    blocks = [b for b in _BLOCK_BREAK.split(head.replace("\r\n", "\n")) if b.strip()]
    blocks = blocks[:_SNIFF_BLOCKS]
    with_role = sum(1 for b in blocks if _ROLE.match(b.strip().split("\n", 1)[0]))
    return len(blocks) >= 2 and with_role >= 0.8 * len(blocks)


def shakespeare_records(path: str | Path) -> list[Record]:
    """One record per speech; a block without a role line continues the previous speech.

    A role line with no speech after it is skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data path {path} does not exist; pass the play's text file")
    try:
        content = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 (byte {err.start}); re-encode it as UTF-8") from None
    speeches: list[tuple[str, list[str]]] = []
    for block in _BLOCK_BREAK.split(content):
        lines = [line.rstrip() for line in block.strip().split("\n") if line.strip()]
        if not lines:
            continue
        if _ROLE.match(lines[0]):
            if len(lines) > 1:  # a role line alone is an empty speech: skip it
                speeches.append((lines[0][:-1].strip(), lines[1:]))
        elif speeches:
            speeches[-1][1].extend(lines)
    if not speeches:
        raise DataError(f"{path} has no 'Role:' blocks; expected the tinyshakespeare layout")
    return [Record(device=role, text="\n".join(lines), label=role) for role, lines in speeches]
