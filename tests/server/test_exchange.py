"""server.exchange.PromptGrid: replies read as they arrive, bounded waits kept."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
from flwr.app import Message, RecordDict

from fedlora.server.exchange import MAX_WAIT_S, PromptGrid
from tests.server.fakes import FakeGrid, task_identity  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("task_identity")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds


class Delayed(FakeGrid):
    """Each message is answered ``delay[node]`` seconds after it was pushed (None: never)."""

    def __init__(self, clock: Clock, delay: dict[int, float | None]) -> None:
        super().__init__(lambda m: None)
        self.clock, self.delay = clock, delay
        self.ready: dict[str, tuple[float, Message]] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            after = self.delay[msg.metadata.dst_node_id]
            if after is not None:
                self.ready[f"m{i}"] = (self.clock() + after, Message(RecordDict(), reply_to=msg))
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        out = [r for mid, (t, r) in self.ready.items() if mid in wanted and t <= self.clock()]
        for r in out:
            self.ready.pop(r.metadata.reply_to_message_id)
        return out


def _messages(nodes: Iterable[int]) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]


def _exchange(delay: dict[int, float | None], timeout: float | None) -> tuple[Any, Clock, Any]:
    clock = Clock()
    inner = Delayed(clock, delay)
    grid = PromptGrid(inner, clock=clock, sleep=clock.sleep)
    replies = list(grid.send_and_receive(_messages(delay), timeout=timeout))
    return replies, clock, grid


def test_the_last_reply_is_read_within_a_quarter_second_of_its_arrival():
    """Flower's deployed grid would read it up to 3 s later, its simulation's 0.1 s."""
    replies, clock, grid = _exchange({1: 0.5, 2: 7.3, 3: 30.0}, timeout=120.0)

    assert len(replies) == 3
    assert 30.0 <= clock.now <= 30.0 + MAX_WAIT_S
    # A long wait costs a few pulls a second (a dozen to back off again after each reply).
    assert grid.pulls < 30.0 / MAX_WAIT_S + 3 * 12


def test_fast_replies_are_read_in_milliseconds():
    replies, clock, _ = _exchange({1: 0.004, 2: 0.02}, timeout=120.0)

    assert len(replies) == 2 and clock.now < 0.06


@pytest.mark.parametrize("timeout", [0.0, 5.0, 12.5])
def test_a_device_that_never_answers_costs_the_timeout_and_no_more(timeout):
    replies, clock, _ = _exchange({1: 0.1, 2: None}, timeout=timeout)

    assert clock.now == pytest.approx(timeout) or (timeout == 0.0 and clock.now == 0.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ([] if timeout < 0.1 else ["m0"])


def test_no_timeout_waits_for_every_reply_as_flowers_grids_do():
    replies, clock, _ = _exchange({1: 100.0, 2: 250.0}, timeout=None)

    assert len(replies) == 2 and clock.now <= 250.0 + MAX_WAIT_S
