"""server.exchange: replies read as they arrive, bounded waits kept (PromptGrid); nodes
known as soon as the grid knows them (wait_for_nodes)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any, cast

import pytest
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedlora.server.exchange import (
    LOCAL_MAX_WAIT_S,
    MAX_WAIT_S,
    PromptGrid,
    is_in_process,
    wait_for_nodes,
)
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


def _exchange(
    delay: dict[int, float | None], timeout: float | None, max_wait_s: float | None = None
) -> tuple[Any, Clock, Any]:
    clock = Clock()
    inner = Delayed(clock, delay)
    grid = PromptGrid(inner, clock=clock, sleep=clock.sleep, max_wait_s=max_wait_s)
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


def test_an_in_process_grid_is_pulled_every_20_ms_at_most():
    """A simulation's pulls cost no request: the last reply of a long stage is read
    within 20 ms, not a quarter second, after it arrives."""
    replies, clock, _ = _exchange({1: 3.0, 2: 4.9}, timeout=60.0, max_wait_s=LOCAL_MAX_WAIT_S)

    assert len(replies) == 2 and 4.9 <= clock.now <= 4.9 + LOCAL_MAX_WAIT_S


def test_a_simulations_grid_is_recognised_as_in_process_and_a_remote_one_is_not():
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    local = InMemoryGrid(state_factory=factory)

    assert is_in_process(local) and is_in_process(PromptGrid(PromptGrid(local)))
    assert PromptGrid(local).max_wait_s == LOCAL_MAX_WAIT_S
    remote = Delayed(Clock(), {})
    assert not is_in_process(remote) and PromptGrid(remote).max_wait_s == MAX_WAIT_S


class NodeGrid:
    """What Flower's client-manager refresh thread asks of a grid: node ids and the run."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.run = SimpleNamespace(run_id=7)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def test_round_one_finds_the_discovered_nodes_at_once_not_after_flowers_5_s_refresh():
    """Flower's DefaultWorkflow registers nodes from a thread that first sleeps 5 s, and
    ``ClientManager.wait_for`` waits on it: round 1 of every run idled that long."""
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.app_utils import start_update_client_manager_thread

    manager = SimpleClientManager()
    grid = cast(Grid, NodeGrid([11, 12, 13]))
    thread, stop, done = start_update_client_manager_thread(grid, manager)
    done.wait()
    try:
        assert not manager.wait_for(3, timeout=1)  # Flower's own wait: nobody yet
        started = time.monotonic()
        assert wait_for_nodes(manager, 3, timeout_s=30.0)
        assert time.monotonic() - started < 0.5
    finally:
        stop.set()
        thread.join(timeout=10)


def test_too_few_nodes_cost_the_timeout_then_the_answer_is_no():
    clock = Clock()
    manager = SimpleNamespace(num_available=lambda: 2)

    assert not wait_for_nodes(manager, 3, 12.0, clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    assert clock.now == pytest.approx(12.0)


def test_nodes_that_join_late_are_seen_within_a_second():
    clock = Clock()
    manager = SimpleNamespace(num_available=lambda: 3 if clock.now >= 4.2 else 1)

    assert wait_for_nodes(manager, 3, 60.0, clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    assert 4.2 <= clock.now <= 5.2
