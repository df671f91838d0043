"""fedlora.client.supernode: Flower's SuperNode loop, polling promptly while a round is on."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from fedlora.client.supernode import (
    FLOWER_IDLE_S,
    FLOWER_REPLY_POLL_S,
    PromptClock,
    install,
    keep_in_step,
)


def test_an_idle_device_pulls_as_flower_does_and_one_mid_round_within_a_fraction_of_a_second():
    slept: list[float] = []
    clock = PromptClock(sleep=slept.append)

    clock.sleep(FLOWER_IDLE_S)  # no round yet: Flower's 3 s
    clock.sleep(FLOWER_REPLY_POLL_S)  # a message is served: its reply is looked for
    clock.sleep(FLOWER_REPLY_POLL_S)
    for _ in range(12):  # then the pulls that find nothing back off to Flower's 3 s
        clock.sleep(FLOWER_IDLE_S)
    clock.sleep(7)  # any other wait is untouched

    assert slept[:3] == [3.0, 0.05, 0.05]
    idle = slept[3:-1]
    assert idle[0] == pytest.approx(0.1) and idle[1] == pytest.approx(0.15)
    assert all(b >= a for a, b in itertools.pairwise(idle))
    assert idle[-1] == 3.0 and sum(idle[:5]) < 1.5  # the next stage is seen within 1.5 s
    assert slept[-1] == 7


def test_everything_else_is_the_time_module():
    clock = PromptClock()

    assert abs(clock.time() - time.time()) < 1.0 and clock.monotonic is time.monotonic


def test_install_patches_flowers_supernode_loop_once():
    from flwr.supernode import start_client_internal as loop

    real = (loop.time, loop._pull_and_store_message, loop._push_messages)
    try:
        first = install()
        assert loop.time is first and install() is first
        assert loop._pull_and_store_message.__wrapped__ is real[1]  # type: ignore[attr-defined]
        assert loop._push_messages.__wrapped__ is real[2]  # type: ignore[attr-defined]
    finally:
        loop.time, loop._pull_and_store_message, loop._push_messages = real


class Msg:
    def __init__(self, mid: str, run: int, reply_to: str = "") -> None:
        self.metadata = SimpleNamespace(message_id=mid, run_id=run, reply_to_message_id=reply_to)


class NodeState:
    """The part of Flower's NodeState the loop's push uses."""

    def __init__(self) -> None:
        self.messages: list[Msg] = []

    def get_messages(self, *, run_ids=None, is_reply=None):  # type: ignore[no-untyped-def]
        return [
            m
            for m in self.messages
            if (run_ids is None or m.metadata.run_id in run_ids)
            and (is_reply is None or bool(m.metadata.reply_to_message_id) == is_reply)
        ]


def test_a_stale_reply_from_a_stopped_run_does_not_put_replies_one_pull_late():
    """After a coordinator restart Flower's loop held the reply of a task of the stopped run
    (run 1); the device then pulled run 2's discovery. Flower's push sent the stale reply
    and returned, leaving discovery's unanswered until the next pull: pushing goes on until
    the message pulled last is answered."""
    state = NodeState()
    state.messages = [Msg("old", 1), Msg("old-reply", 1, reply_to="old"), Msg("disc", 2)]
    sent: list[str] = []

    def flowers_push(*, state: NodeState, **_: object) -> None:
        replies = state.get_messages(is_reply=True)
        if not replies:  # the ClientApp answers while Flower's push waits
            replies = [Msg("disc-reply", 2, reply_to="disc")]
        for r in replies:
            sent.append(r.metadata.message_id)
            gone = {r.metadata.message_id, r.metadata.reply_to_message_id}
            state.messages = [m for m in state.messages if m.metadata.message_id not in gone]

    pull, push = keep_in_step(lambda **_: 2, flowers_push)
    assert pull(state=state) == 2  # the loop pulled run 2's discovery last

    push(state=state, object_store=None, send=None, push_object=None)

    assert sent == ["old-reply", "disc-reply"] and state.messages == []


def test_a_push_in_step_is_flowers_push_once():
    state = NodeState()
    state.messages = [Msg("m", 5), Msg("m-reply", 5, reply_to="m")]
    calls = []

    def flowers_push(*, state: NodeState, **_: object) -> None:
        calls.append(1)
        state.messages = []

    pull, push = keep_in_step(lambda **_: 5, flowers_push)
    pull()
    push(state=state)

    assert calls == [1]


def test_the_module_runs_flowers_supernode_with_its_arguments():
    """``fedlora device`` runs it in place of ``flower-supernode``: same CLI."""
    out = subprocess.run(
        [sys.executable, "-m", "fedlora.client.supernode", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert out.returncode == 0, out.stderr
    assert "--superlink" in out.stdout and "--isolation" in out.stdout
    assert "flower-supernode" in out.stdout
