"""A grid that reads the devices' replies as they arrive, not on the grid's own schedule.

Flower's grids poll for replies at a fixed interval: the simulation's in-memory grid
every 0.1 s, the deployed coordinator's (``HttpGrid``, to its SuperLink) every **3 s**.
A SecAgg+ round is four such exchanges one after another, so a deployed round idled up
to 12 s (6 s on average) after its devices had answered, and a simulated one about
0.2 s. :class:`PromptGrid` wraps the coordinator's grid: ``send_and_receive`` pushes the
same messages and pulls with the grid's own ``pull_messages``, first after 10 ms, then
backing off by half each time to at most 0.25 s, starting over whenever replies arrive,
so a reply is read within a quarter second of its arrival and a long wait costs a
handful of pulls a second. A simulation's grid (Flower's ``InMemoryGrid``) pulls from a
LinkState in the same process, which costs microseconds, so there the backoff stops at
20 ms (:data:`LOCAL_MAX_WAIT_S`): the last reply of a long training stage is read within
20 ms, not up to 0.25 s later; and where the simulation's hand-out is fedlora's
(:mod:`fedlora.simdispatch`), its doorbell wakes the coordinator as each reply is stored
and the hand-out as soon as a stage's messages are pushed, the polls only bounding each
wait. Everything else is the wrapped grid's.

:func:`wait_for_nodes` does the same for the legacy strategy's client manager. Flower's
``DefaultWorkflow`` tells that manager about the grid's nodes from a thread that sleeps
**5 s** before its first look, and ``ClientManager.wait_for`` blocks on that thread, so
round 1 of every run (simulated or deployed) sat idle for up to 5 s after discovery
had already found the devices.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.server.client_manager import ClientManager
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedlora.simdispatch import Doorbell, doorbell

FIRST_WAIT_S = 0.01
MAX_WAIT_S = 0.25
LOCAL_MAX_WAIT_S = 0.02
"""The longest wait between pulls from an in-process LinkState (a simulation)."""
BACKOFF = 1.5
NODES_MAX_WAIT_S = 1.0
"""The longest wait between two looks at the client manager (:func:`wait_for_nodes`)."""


def _innermost(grid: Grid) -> Grid:
    while isinstance(grid, DelegatingGrid):
        grid = grid._grid
    return grid


def is_in_process(grid: Grid) -> bool:
    """Whether ``grid`` reads an in-process LinkState (Flower's simulation), where a pull
    costs no request."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return isinstance(_innermost(grid), InMemoryGrid)


def _doorbell(grid: Grid) -> Doorbell | None:
    """The simulation's doorbell on ``grid``'s LinkState (:mod:`fedlora.simdispatch`), if any."""
    return doorbell(getattr(_innermost(grid), "state", None)) if is_in_process(grid) else None


def wait_for_nodes(
    client_manager: ClientManager,
    count: int,
    timeout_s: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Whether ``count`` nodes are available within ``timeout_s``, asking as
    ``ClientManager.wait_for`` would but without waiting on Flower's 5-s refresh thread.

    Under ``DefaultWorkflow`` the manager's ``num_available`` first reads the grid's node
    ids (Flower wraps it so), so the first look sees every node discovery found; a look
    that comes up short is repeated after 10 ms, backing off to 1 s.
    """
    end = clock() + timeout_s
    wait = FIRST_WAIT_S
    while client_manager.num_available() < count:
        left = end - clock()
        if left <= 0:
            return False
        sleep(min(wait, left))
        wait = min(wait * BACKOFF, NODES_MAX_WAIT_S)
    return True


class DelegatingGrid(Grid):
    """A grid that passes every call to ``self._grid``; wrappers override what they change."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)

    # ---------------------------------------------------------------- delegation
    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)


class PromptGrid(DelegatingGrid):
    """``grid``, with replies pulled as they arrive (see the module's text)."""

    def __init__(
        self,
        grid: Grid,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        max_wait_s: float | None = None,
    ) -> None:
        super().__init__(grid)
        self._clock = clock
        self._sleep = sleep
        #: The longest wait between two pulls (None: 20 ms in process, else 0.25 s).
        self.max_wait_s: float = (
            max_wait_s
            if max_wait_s is not None
            else (LOCAL_MAX_WAIT_S if is_in_process(grid) else MAX_WAIT_S)
        )
        #: Pulls made (each one a request to the SuperLink when deployed).
        self.pulls = 0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """The replies to ``messages`` that arrive within ``timeout`` seconds (None: until
        every message is answered, as Flower's grids wait)."""
        bell = _doorbell(self._grid)
        pending = set(self._grid.push_messages(messages))
        if bell is not None:
            bell.pushed.set()  # the simulation hands them out now, not at its next poll
        end = None if timeout is None else self._clock() + timeout
        replies: list[Message] = []
        wait = FIRST_WAIT_S
        while pending:
            if bell is not None:
                bell.replied.clear()  # before the pull: a reply stored after it rings again
            got = list(self._grid.pull_messages(pending))
            self.pulls += 1
            if got:
                replies.extend(got)
                pending.difference_update(r.metadata.reply_to_message_id for r in got)
                wait = FIRST_WAIT_S
                if not pending:
                    break
            left = float("inf") if end is None else end - self._clock()
            if left <= 0:
                break
            if bell is None:
                self._sleep(min(wait, left))
            else:  # woken by the next stored reply, or by the poll's interval
                bell.replied.wait(min(wait, left))
            wait = min(wait * BACKOFF, self.max_wait_s)
        return replies
