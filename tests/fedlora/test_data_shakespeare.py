"""Plays as fleets: one device per speaking role (uses the shared file when present)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora.data.fleet import build_fleet
from fedlora.data.shakespeare import find_shakespeare, looks_like_play, shakespeare_records
from fedlora.errors import DataError

PLAY = find_shakespeare()
needs_play = pytest.mark.skipif(PLAY is None, reason="../shared/data/tinyshakespeare.txt absent")


def test_small_play_parses_speeches_roles_and_continuations(tmp_path: Path) -> None:
    path = tmp_path / "play.txt"
    path.write_text(
        "First Citizen:\nSpeak, speak.\nNow.\n\nALL:\nResolved.\n\nTITUS:\n\n"
        "continued without a role\n\nSenators, &C:\nWe'll surety him.\n",
        encoding="utf-8",
    )

    records = shakespeare_records(path)

    assert [(r.device, r.text) for r in records] == [
        ("First Citizen", "Speak, speak.\nNow."),
        ("ALL", "Resolved.\ncontinued without a role"),
        ("Senators, &C", "We'll surety him."),
    ]
    assert all(r.label == r.device for r in records)
    assert looks_like_play(path)


def test_jsonl_and_missing_files_are_not_plays(tmp_path: Path) -> None:
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"device": "a", "text": "x"}\n', encoding="utf-8")

    assert not looks_like_play(notes)
    assert not looks_like_play(tmp_path / "absent.txt")
    with pytest.raises(DataError, match="does not exist"):
        shakespeare_records(tmp_path / "absent.txt")


@needs_play
def test_tinyshakespeare_roles_become_devices() -> None:
    assert PLAY is not None
    records = shakespeare_records(PLAY)
    roles = {r.device for r in records}

    assert records[0].device == "First Citizen"
    assert records[0].text == "Before we proceed any further, hear me speak."
    assert len(records) > 7000 and {"ROMEO", "JULIET", "GLOUCESTER"} <= roles
    assert not any(r.text.endswith(":") and "\n" not in r.text for r in records)


@needs_play
def test_build_fleet_reads_the_play_with_roles_as_devices() -> None:
    fleet = build_fleet(PLAY, num_devices=12, seed=0)

    assert len(fleet.devices) == 12
    assert all(not d.device.startswith("device-") for d in fleet.devices)
    assert fleet.description.startswith("play tinyshakespeare.txt (one device per role)")
