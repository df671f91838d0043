"""Reading JSONL files and per-device directories, and every malformed input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.data.records import Record, read_records
from fedlora.errors import DataError


def _jsonl(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_records_keep_device_text_and_optional_label(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "notes.jsonl",
        json.dumps({"device": "a", "text": "Buy milk.", "label": "food"}),
        "",
        json.dumps({"device": "b", "text": "Call Zoë at 6pm."}),
    )

    records = read_records(path)

    assert records == [
        Record(device="a", text="Buy milk.", label="food"),
        Record(device="b", text="Call Zoë at 6pm.", label=None),
    ]


def test_line_without_device_names_file_line_and_field(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "notes.jsonl",
        json.dumps({"device": "a", "text": "ok"}),
        json.dumps({"text": "no device"}),
    )

    with pytest.raises(DataError) as err:
        read_records(path)

    message = str(err.value)
    assert "notes.jsonl line 2" in message and "'device'" in message
    assert "\n" not in message


def test_bad_json_names_the_line(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "n.jsonl", json.dumps({"device": "a", "text": "x"}), "{not json")

    with pytest.raises(DataError, match=r"n\.jsonl line 2 is not valid JSON"):
        read_records(path)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('["a", "b"]', "not a JSON object"),
        ('{"device": "a"}', "no 'text' field"),
        ('{"device": 3, "text": "x"}', "'device' must be a string"),
        ('{"device": "a", "text": "x", "label": 1}', "'label' must be a string"),
        ('{"device": "", "text": "x"}', "empty 'device'"),
    ],
)
def test_malformed_lines_are_refused(tmp_path: Path, line: str, match: str) -> None:
    path = _jsonl(tmp_path / "n.jsonl", line)

    with pytest.raises(DataError, match=match):
        read_records(path)


def test_directory_has_one_device_per_text_file_and_paragraph_records(tmp_path: Path) -> None:
    (tmp_path / "phone-1.txt").write_text("First note.\nstill first.\n\n \nSecond note.\n", "utf-8")
    (tmp_path / "phone-2.txt").write_text("Only one, with ünïcode.", encoding="utf-8")
    (tmp_path / "README.md").write_text("not a device", encoding="utf-8")

    records = read_records(tmp_path)

    assert records == [
        Record("phone-1", "First note.\nstill first."),
        Record("phone-1", "Second note."),
        Record("phone-2", "Only one, with ünïcode."),
    ]


def test_missing_path_says_it_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data path .*nope does not exist"):
        read_records(tmp_path / "nope")


def test_empty_inputs_are_refused(tmp_path: Path) -> None:
    empty_file = _jsonl(tmp_path / "empty.jsonl", "")
    empty_dir = tmp_path / "dir"
    empty_dir.mkdir()

    with pytest.raises(DataError, match="no records"):
        read_records(empty_file)
    with pytest.raises(DataError, match=r"no \.txt files"):
        read_records(empty_dir)


def test_non_utf8_text_is_refused_with_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"device": "a", "text": "caf\xe9"}\n')

    with pytest.raises(DataError, match=r"latin1\.jsonl is not UTF-8"):
        read_records(path)
