"""A grid that reads the devices' replies as they arrive, not on the grid's own schedule.

Flower's grids poll for replies at a fixed interval: the simulation's in-memory grid
every 0.1 s, the deployed coordinator's (``HttpGrid``, to its SuperLink) every **3 s**.
A SecAgg+ round is four such exchanges one after another, so a deployed round idled up
to 12 s (6 s on average) after its devices had answered, and a simulated one about
0.2 s. :class:`PromptGrid` wraps the coordinator's grid: ``send_and_receive`` pushes the
same messages and pulls with the grid's own ``pull_messages``, first after 10 ms, then
backing off by half each time to at most 0.25 s, starting over whenever replies arrive,
so a reply is read within a quarter second of its arrival and a long wait costs a
handful of pulls a second. Everything else is the wrapped grid's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

FIRST_WAIT_S = 0.01
MAX_WAIT_S = 0.25
BACKOFF = 1.5


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
    ) -> None:
        super().__init__(grid)
        self._clock = clock
        self._sleep = sleep
        #: Pulls made (each one a request to the SuperLink when deployed).
        self.pulls = 0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """The replies to ``messages`` that arrive within ``timeout`` seconds (None: until
        every message is answered, as Flower's grids wait)."""
        pending = set(self._grid.push_messages(messages))
        end = None if timeout is None else self._clock() + timeout
        replies: list[Message] = []
        wait = FIRST_WAIT_S
        while pending:
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
            self._sleep(min(wait, left))
            wait = min(wait * BACKOFF, MAX_WAIT_S)
        return replies
