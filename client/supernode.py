"""Flower's SuperNode, polling promptly while a round is on: ``python -m fedlora.client.supernode``.

``fedlora device`` runs this in place of ``flower-supernode`` (same arguments, same
process, Flower's code). Flower 1.39's SuperNode loop (``start_client_internal``) sleeps
**3 s** whenever a pull from the SuperLink finds no message, and checks every **0.5 s**
whether the ClientApp's reply is ready. A SecAgg+ round is four exchanges, each
waiting for the device's next pull: a deployed round idled about 1.5 s an exchange on
average, up to 3 s, after the coordinator had sent its request.

:class:`PromptClock` stands in for the ``time`` module inside that one Flower module and
changes only those two waits:

- after a message (the SuperNode waited for a reply, so a round is on), the next empty
  pull waits 0.1 s, then 1.5× longer each time up to Flower's 3 s: an idle device pulls
  as often as Flower's does, and one mid-round sees the next stage's request within a
  fraction of a second;
- the wait for the ClientApp's reply is 50 ms instead of 0.5 s (a look into the
  SuperNode's own in-memory state, no request).

Every other call (``time.time`` and the like) is the real module's. The patch is tied
to Flower 1.39's module, as the pin is (``flwr>=1.39,<1.40``); if the module no longer
sleeps those exact values the waits are Flower's own.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

FLOWER_IDLE_S = 3
"""What Flower's loop sleeps after an empty pull."""
FLOWER_REPLY_POLL_S = 0.5
"""What it sleeps between looks for the ClientApp's reply (and for a reply's content)."""

IDLE_FIRST_S = 0.1
IDLE_BACKOFF = 1.5
REPLY_POLL_S = 0.05


class PromptClock:
    """The ``time`` module for Flower's SuperNode loop, with the two waits above changed."""

    def __init__(self, sleep: Callable[[float], None] = time.sleep) -> None:
        self._sleep = sleep
        #: The next empty pull's wait: short right after a message, Flower's 3 s when idle.
        self.idle_s = float(FLOWER_IDLE_S)

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_S:
            self._sleep(self.idle_s)
            self.idle_s = min(self.idle_s * IDLE_BACKOFF, float(FLOWER_IDLE_S))
        elif seconds == FLOWER_REPLY_POLL_S:
            self.idle_s = IDLE_FIRST_S  # a message is being served: the next may be near
            self._sleep(REPLY_POLL_S)
        else:
            self._sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def install() -> PromptClock:
    """Put a :class:`PromptClock` into Flower's SuperNode loop (once per process)."""
    from flwr.supernode import start_client_internal

    current: Any = start_client_internal.time
    if isinstance(current, PromptClock):
        return current
    clock = PromptClock()
    setattr(start_client_internal, "time", clock)  # noqa: B010 (the module attribute)
    return clock


def main() -> None:
    install()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
