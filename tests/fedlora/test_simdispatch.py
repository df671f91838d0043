"""fedlora.simdispatch: the simulation engine's message hand-out, one scan per poll.

On a real Flower in-memory LinkState, set up as ``run_simulation`` sets it up, one pass
of fedlora's hand-out yields the very messages, in the very order, that one pass of
Flower's own ``add_messages_to_queue`` yields, and marks them delivered alike.
"""

from __future__ import annotations

import threading
import time
from queue import Queue
from types import SimpleNamespace
from typing import Any, cast

import pytest
from flwr.app import Message, RecordDict
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedlora import simdispatch
from tests.server.fakes import task_identity  # noqa: F401  (a fixture: the run 7 ServerApp)


class _OnePass(threading.Event):
    """An event that lets the engine's loop run exactly once."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls > 1

    def wait(self, timeout: float | None = None) -> bool:
        return True


def _fleet(nodes: int, per_node: list[int]) -> tuple[Any, dict[int, int], list[str]]:
    """A LinkState with ``nodes`` simulated nodes and per_node[i] messages pushed to node i."""
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.primary_task_id = 11
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[11] = Task(task_id=11, run_id=run.run_id)
    mapping = vce_api._register_nodes(nodes, factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    order = list(mapping)
    ids = []
    for i, count in enumerate(per_node):
        for _ in range(count):
            msg = Message(content=RecordDict(), dst_node_id=order[i], message_type="query")
            ids.extend(grid.push_messages([msg]))
    return state, mapping, ids


def _one_pass(function: Any, state: Any, mapping: dict[int, int]) -> list[str]:
    queue: Queue[Message] = Queue()
    function(state, queue, mapping, _OnePass())
    return [queue.get_nowait().metadata.message_id for _ in range(queue.qsize())]


@pytest.mark.usefixtures("task_identity")
def test_one_pass_hands_out_what_flowers_pass_hands_out_in_the_same_order():
    simdispatch.install()
    per_node = [2, 0, 1, 3, 0, 1, 1, 0, 2, 1]
    ours_state, ours_map, _ = _fleet(10, per_node)
    theirs_state, theirs_map, _ = _fleet(10, per_node)
    flower = simdispatch._FLOWER_ORIGINAL
    assert flower is not None and vce_api.add_messages_to_queue is simdispatch.add_messages_to_queue

    for _ in range(4):  # until every message is handed out
        ours = _one_pass(simdispatch.add_messages_to_queue, ours_state, ours_map)
        theirs = _one_pass(flower, theirs_state, theirs_map)
        # Message ids differ between the two states; the destinations, in order, must not.
        dst = lambda state, ids: [state.message_ins_store[i].metadata.dst_node_id for i in ids]  # noqa: E731
        ours_nodes = [list(ours_map).index(n) for n in dst(ours_state, ours)]
        theirs_nodes = [list(theirs_map).index(n) for n in dst(theirs_state, theirs)]
        assert ours_nodes == theirs_nodes
    delivered = [m.metadata.delivered_at != "" for m in ours_state.message_ins_store.values()]
    assert len(delivered) == sum(per_node) and all(delivered)


@pytest.mark.usefixtures("task_identity")
def test_at_a_thousand_nodes_a_pass_scans_the_store_once():
    ours_state, mapping, _ = _fleet(1000, [1] * 50)
    theirs_state, theirs_map, _ = _fleet(1000, [1] * 50)
    flower = (
        simdispatch._flower_function()
        if simdispatch._FLOWER_ORIGINAL is None
        else (simdispatch._FLOWER_ORIGINAL)
    )
    # Deliver all 50 first: what the engine polls most of a round is a store of delivered
    # messages waiting for their replies.
    assert len(_one_pass(simdispatch.add_messages_to_queue, ours_state, mapping)) == 50
    assert len(_one_pass(flower, theirs_state, theirs_map)) == 50

    started = time.perf_counter()
    for _ in range(5):
        assert _one_pass(simdispatch.add_messages_to_queue, ours_state, mapping) == []
    ours = (time.perf_counter() - started) / 5
    started = time.perf_counter()
    assert _one_pass(flower, theirs_state, theirs_map) == []
    theirs = time.perf_counter() - started

    assert ours < theirs / 10, f"a poll: ours {ours * 1e3:.2f} ms, Flower's {theirs * 1e3:.1f} ms"


def _hand_out_in_background(state: Any, mapping: dict[int, int]) -> tuple[Any, Any, Any]:
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    thread = threading.Thread(
        target=simdispatch.add_messages_to_queue, args=(state, queue, mapping, stop), daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 5.0
    while simdispatch.doorbell(state) is None and time.monotonic() < deadline:
        time.sleep(0.001)
    return queue, stop, thread


def _stop(stop: threading.Event, thread: threading.Thread, state: Any) -> None:
    stop.set()
    bell = simdispatch.doorbell(state)
    if bell is not None:
        bell.pushed.set()
    thread.join(timeout=5.0)


@pytest.mark.usefixtures("task_identity")
def test_a_rung_push_is_handed_out_at_once_not_at_the_next_poll(monkeypatch):
    """With the poll stretched to 5 s, a push that rings the doorbell still reaches the
    engine's queue within a second: the ring, not the poll, wakes the hand-out."""
    simdispatch.install()
    monkeypatch.setattr(simdispatch, "POLL_S", 5.0)
    state, mapping, _ = _fleet(3, [0, 0, 0])
    queue, stop, thread = _hand_out_in_background(state, mapping)
    try:
        bell = simdispatch.doorbell(state)
        assert bell is not None
        time.sleep(0.05)  # the first (empty) pass is done: the loop waits on the bell
        msg = Message(content=RecordDict(), dst_node_id=list(mapping)[1], message_type="query")
        sent = time.monotonic()
        pushed = _push(state, msg)
        bell.pushed.set()
        got = queue.get(timeout=2.0)
        assert got.metadata.message_id == pushed
        assert time.monotonic() - sent < 1.0
    finally:
        _stop(stop, thread, state)


def _push(state: Any, msg: Message) -> str:
    """Store ``msg`` for its node as the coordinator's grid does (run 7, task 11)."""
    from flwr.superlink.grid import InMemoryGrid

    factory = SimpleNamespace(state=lambda: state)
    grid = InMemoryGrid(state_factory=cast(Any, factory))
    run = state.run_ids[7].run
    grid.set_run(run)
    return next(iter(grid.push_messages([msg])))


@pytest.mark.usefixtures("task_identity")
def test_a_stored_reply_wakes_the_coordinator_before_its_next_poll():
    """A reply stored by the engine rings the doorbell; the coordinator's PromptGrid,
    whose polls have backed off, reads it within 0.15 s of its arrival (polling alone:
    0.3–0.5 s)."""
    from flwr.superlink.grid import InMemoryGrid

    from fedlora.server.exchange import PromptGrid

    simdispatch.install()
    state, mapping, _ = _fleet(2, [0, 0])
    queue, stop, thread = _hand_out_in_background(state, mapping)
    try:
        factory = SimpleNamespace(state=lambda: state)
        inner = InMemoryGrid(state_factory=cast(Any, factory))
        inner.set_run(state.run_ids[7].run)
        grid = PromptGrid(inner, max_wait_s=5.0)
        msg = Message(content=RecordDict(), dst_node_id=next(iter(mapping)), message_type="query")
        arrived: list[float] = []

        def answer() -> None:  # the engine's worker: take the message, reply 1.2 s later
            ins = queue.get(timeout=5.0)
            time.sleep(1.2)
            reply = Message(RecordDict(), reply_to=ins)
            reply.metadata.__dict__["_message_id"] = "reply-1"
            arrived.append(time.monotonic())
            state.store_message_res(reply)

        worker = threading.Thread(target=answer, daemon=True)
        worker.start()
        replies = list(grid.send_and_receive([msg], timeout=10.0))
        read = time.monotonic()
        worker.join(timeout=5.0)
        assert [r.metadata.reply_to_message_id for r in replies] == [msg.metadata.message_id]
        # Polling alone: waits of 10, 15, 22, … ms; the one spanning 1.2 s ends near 1.7 s.
        assert read - arrived[0] < 0.15, f"read {read - arrived[0]:.3f} s after it arrived"
    finally:
        _stop(stop, thread, state)
