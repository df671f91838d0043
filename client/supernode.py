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

Every other call (``time.time`` and the like) is the real module's.

It also keeps the loop's pull and push in step after a coordinator restart
(:func:`keep_in_step`). Flower 1.39 stores a pulled message and creates its task before
confirming receipt; when the confirmation finds the run stopped (the coordinator died
mid-round), ``RunNotRunningException`` (a ``BaseException``) passes the handler that
would delete them, so the task still runs and its stale reply waits in the node's
state. The next push then sends that reply (the SuperLink ignores it) in place of the
reply to the message just pulled, and from then on every reply goes out one pull late:
the restarted coordinator waited out its timeouts (two of 120 s in
``tests/e2e/test_deployment.py``) for a device that had answered. After Flower's push,
while the message pulled last is still unanswered, fedlora pushes again, which waits for
its reply as Flower's own push does.

The patches are tied to Flower 1.39's module, as the pin is (``flwr>=1.39,<1.40``); if
the module no longer sleeps those exact values the waits are Flower's own.
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


def keep_in_step(pull: Callable[..., Any], push: Callable[..., None]) -> tuple[Any, Any]:
    """Flower's ``_pull_and_store_message`` and ``_push_messages``, wrapped so that a push
    does not return while the message pulled last is unanswered (see the module's text)."""
    last: dict[str, Any] = {"run": None}

    def pulled(*args: Any, **kwargs: Any) -> Any:
        last["run"] = run_id = pull(*args, **kwargs)
        return run_id

    def pushed(*args: Any, **kwargs: Any) -> None:
        state = kwargs["state"] if "state" in kwargs else args[0]
        push(*args, **kwargs)
        while last["run"] is not None and state.get_messages(run_ids=[last["run"]], is_reply=False):
            push(*args, **kwargs)  # the reply sent was a stale one: wait for this one's

    pulled.__wrapped__ = pull  # type: ignore[attr-defined]
    pushed.__wrapped__ = push  # type: ignore[attr-defined]
    return pulled, pushed


def install() -> PromptClock:
    """Put a :class:`PromptClock` and :func:`keep_in_step` into Flower's SuperNode loop
    (once per process)."""
    from flwr.supernode import start_client_internal as loop

    current: Any = loop.time
    if isinstance(current, PromptClock):
        return current
    clock = PromptClock()
    setattr(loop, "time", clock)  # noqa: B010 (the module attribute)
    pulled, pushed = keep_in_step(loop._pull_and_store_message, loop._push_messages)
    setattr(loop, "_pull_and_store_message", pulled)  # noqa: B010
    setattr(loop, "_push_messages", pushed)  # noqa: B010
    return clock


def main() -> None:
    install()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
