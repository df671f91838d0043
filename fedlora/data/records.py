"""Reading a user's fleet data into :class:`Record` objects.

Two on-disk layouts are understood:

* a JSONL file, one object per line with string fields ``device`` and ``text``
  and an optional string ``label``;
* a directory with one UTF-8 text file per device (``*.txt``; device id = file
  stem), records separated by blank lines.

A record is the privacy unit: DP-SGD protects one record, so a record is never
split or merged downstream (see :mod:`fedlora.data.tokenize`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from fedlora.errors import DataError

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n+")


@dataclass(frozen=True)
class Record:
    """One text written on one device; ``label`` is optional metadata (e.g. a topic)."""

    device: str
    text: str
    label: str | None = None


def read_records(path: str | Path) -> list[Record]:
    """Read a JSONL file or a directory of per-device text files."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist; pass a JSONL file or a directory")
    records = _read_directory(path) if path.is_dir() else _read_jsonl(path)
    if not records:
        raise DataError(f"data path {path} holds no records; add at least one non-empty text")
    return records


def _read_jsonl(path: Path) -> list[Record]:
    records: list[Record] = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.strip():
            records.append(_parse_line(path, number, line))
    return records


def _parse_line(path: Path, number: int, line: str) -> Record:
    where = f"{path} line {number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where} is not valid JSON ({err.msg}); fix that line") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where} is not a JSON object; write one object per line")
    for field in ("device", "text"):
        if field not in obj:
            raise DataError(f"{where} has no '{field}' field; every line needs device and text")
        if not isinstance(obj[field], str):
            raise DataError(f"{where}: '{field}' must be a string")
    label = obj.get("label")
    if label is not None and not isinstance(label, str):
        raise DataError(f"{where}: 'label' must be a string or absent")
    if not obj["device"]:
        raise DataError(f"{where} has an empty 'device'; give every record a device id")
    return Record(device=obj["device"], text=obj["text"], label=label)


def _read_directory(path: Path) -> list[Record]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".txt")
    if not files:
        raise DataError(f"data directory {path} has no .txt files; write one file per device")
    records: list[Record] = []
    for file in files:
        content = _read_text(file).replace("\r\n", "\n")
        for paragraph in _PARAGRAPH_BREAK.split(content):
            text = paragraph.strip()
            if text:
                records.append(Record(device=file.stem, text=text))
    return records


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 (byte {err.start}); re-encode it as UTF-8") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None
