"""fedlora.auditlog: the coordinator's hash-chained event log."""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
from datetime import datetime
from pathlib import Path

import pytest

from fedlora.auditlog import (
    ACTIONS,
    AUDIT_LOG,
    GENESIS,
    append_event,
    format_event,
    local_actor,
    read_events,
)
from fedlora.errors import ConfigError

OPERATOR = "operator (key sha256:" + "ab" * 32 + ")"


def _lines(data_dir: Path) -> list[bytes]:
    return (data_dir / AUDIT_LOG).read_bytes().splitlines(keepends=True)


def _write_lines(data_dir: Path, lines: list[bytes]) -> None:
    (data_dir / AUDIT_LOG).write_bytes(b"".join(lines))


def _three(data_dir: Path) -> None:
    append_event(data_dir, "run.start", OPERATOR, run="first", run_id=7)
    append_event(data_dir, "run.stop", OPERATOR, run="first", run_id=7)
    append_event(data_dir, "key.revoke", "local:alice@coord (filesystem)", device_id="d1")


def test_an_appended_event_is_read_back_as_written(tmp_path: Path) -> None:
    written = append_event(tmp_path, "run.start", OPERATOR, run="first", run_id=7)

    (event,) = read_events(tmp_path)

    assert event == written
    assert (event["seq"], event["action"], event["actor"]) == (1, "run.start", OPERATOR)
    assert event["details"] == {"run": "first", "run_id": 7}
    assert event["prev"] == GENESIS
    stamp = datetime.fromisoformat(event["time"])
    assert stamp.utcoffset() is not None and stamp.utcoffset().total_seconds() == 0
    assert stamp.timestamp() == event["unix"]


def test_each_line_is_one_json_event_chained_to_the_line_before(tmp_path: Path) -> None:
    _three(tmp_path)

    lines = _lines(tmp_path)
    events = read_events(tmp_path)

    assert [e["action"] for e in events] == ["run.start", "run.stop", "key.revoke"]
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert [json.loads(line) for line in lines] == events
    for before, after in itertools.pairwise(lines):
        assert json.loads(after)["prev"] == hashlib.sha256(before.rstrip(b"\n")).hexdigest()


def test_no_log_reads_as_no_events(tmp_path: Path) -> None:
    assert read_events(tmp_path) == []


@pytest.mark.parametrize("action", ["run.delete", "", "RUN.START", "key.rotate"])
def test_unknown_actions_are_refused(tmp_path: Path, action: str) -> None:
    with pytest.raises(ValueError, match="is not one of"):
        append_event(tmp_path, action, OPERATOR)
    assert not (tmp_path / AUDIT_LOG).exists()


def test_every_documented_action_is_accepted(tmp_path: Path) -> None:
    for action in sorted(ACTIONS):
        append_event(tmp_path, action, OPERATOR)

    assert {e["action"] for e in read_events(tmp_path)} == {
        "run.start", "run.resume", "run.stop", "key.register", "key.revoke",
    }  # fmt: skip


def test_an_empty_actor_and_unserialisable_details_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="actor"):
        append_event(tmp_path, "run.start", "  ")
    with pytest.raises(TypeError):
        append_event(tmp_path, "run.start", OPERATOR, run=object())
    assert not (tmp_path / AUDIT_LOG).exists()


def test_an_edited_line_breaks_the_chain_at_the_next_line(tmp_path: Path) -> None:
    _three(tmp_path)
    lines = _lines(tmp_path)
    lines[0] = lines[0].replace(b'"run_id":7', b'"run_id":8')
    _write_lines(tmp_path, lines)

    with pytest.raises(ConfigError) as err:
        read_events(tmp_path)

    message = str(err.value)
    assert "audit log broken at line 2: it does not follow line 1" in message
    assert "\n" not in message


def test_a_removed_line_breaks_the_chain(tmp_path: Path) -> None:
    _three(tmp_path)
    lines = _lines(tmp_path)
    _write_lines(tmp_path, [lines[0], lines[2]])

    with pytest.raises(ConfigError, match="broken at line 2: it does not follow line 1"):
        read_events(tmp_path)


def test_a_removed_first_line_breaks_the_chain(tmp_path: Path) -> None:
    _three(tmp_path)
    _write_lines(tmp_path, _lines(tmp_path)[1:])

    with pytest.raises(ConfigError, match="broken at line 1: the first line does not start"):
        read_events(tmp_path)


def test_a_rewritten_line_with_a_recomputed_hash_still_breaks_the_line_after_it(
    tmp_path: Path,
) -> None:
    # Forging line 2 and fixing its own prev is not enough: line 3 names line 2's hash.
    _three(tmp_path)
    lines = _lines(tmp_path)
    forged = json.loads(lines[1])
    forged["actor"] = "someone else"
    lines[1] = json.dumps(forged, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    _write_lines(tmp_path, lines)

    with pytest.raises(ConfigError, match="broken at line 3: it does not follow line 2"):
        read_events(tmp_path)


@pytest.mark.parametrize(
    ("garbage", "why"),
    [(b"not json\n", "not JSON"), (b'{"seq": 4}\n', "exactly the fields"), (b"{}", "incomplete")],
)
def test_a_line_that_is_not_an_event_is_named(tmp_path: Path, garbage: bytes, why: str) -> None:
    _three(tmp_path)
    with (tmp_path / AUDIT_LOG).open("ab") as f:
        f.write(garbage)

    with pytest.raises(ConfigError, match=f"broken at line 4: .*{why}"):
        read_events(tmp_path)


def test_appending_to_a_log_that_ends_mid_line_is_refused(tmp_path: Path) -> None:
    _three(tmp_path)
    with (tmp_path / AUDIT_LOG).open("ab") as f:
        f.write(b'{"seq": 4, "act')
    before = (tmp_path / AUDIT_LOG).read_bytes()

    with pytest.raises(ConfigError, match=r"line 4 is incomplete \(a write was cut off\)"):
        append_event(tmp_path, "run.start", OPERATOR)
    assert (tmp_path / AUDIT_LOG).read_bytes() == before


def test_appends_continue_the_chain_past_a_long_line(tmp_path: Path) -> None:
    append_event(tmp_path, "run.start", OPERATOR, note="x" * 20_000)  # longer than a tail read
    append_event(tmp_path, "run.stop", OPERATOR)

    assert [e["seq"] for e in read_events(tmp_path)] == [1, 2]


def _append_many(data_dir: str, worker: int, count: int) -> None:
    for i in range(count):
        append_event(data_dir, "run.start", f"worker-{worker}", i=i)


def test_concurrent_appends_from_several_processes_keep_one_valid_chain(tmp_path: Path) -> None:
    # arrange: four processes appending at once, fork so they start quickly
    ctx = multiprocessing.get_context("fork")
    workers, count = 4, 30
    procs = [
        ctx.Process(target=_append_many, args=(str(tmp_path), w, count)) for w in range(workers)
    ]

    # act
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)

    # assert: every event is there once, in one unbroken chain
    assert [p.exitcode for p in procs] == [0] * workers
    events = read_events(tmp_path)
    assert [e["seq"] for e in events] == list(range(1, workers * count + 1))
    seen = sorted((e["actor"], e["details"]["i"]) for e in events)
    assert seen == sorted((f"worker-{w}", i) for w in range(workers) for i in range(count))
    for w in range(workers):  # each process's own events stay in its order
        mine = [e["details"]["i"] for e in events if e["actor"] == f"worker-{w}"]
        assert mine == list(range(count))


def test_the_log_is_not_writable_by_others(tmp_path: Path) -> None:
    append_event(tmp_path, "run.start", OPERATOR)

    mode = os.stat(tmp_path / AUDIT_LOG).st_mode & 0o777
    assert mode & 0o022 == 0


def test_local_actor_names_user_host_and_the_filesystem() -> None:
    actor = local_actor()

    assert actor.startswith("local:") and actor.endswith(" (filesystem)")
    assert "@" in actor


def test_format_event_is_one_line(tmp_path: Path) -> None:
    event = append_event(tmp_path, "key.register", "local:a@b (filesystem)", device_id="d1")

    line = format_event(event)

    assert "\n" not in line
    assert line.startswith(event["time"])
    assert line.endswith("key.register  local:a@b (filesystem)  device_id=d1")
