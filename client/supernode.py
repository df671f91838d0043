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

It also mends one bug of that loop (:func:`clean_pull`): a message pulled while the
coordinator stops its run (killed mid-round) stays in the SuperNode's state with a
task, because the confirmation raises ``RunNotRunningException``, a ``BaseException``
that skips Flower's clean-up. The task then runs and its stale reply takes the next
run's push: every reply goes out one pull late, and a restarted coordinator waits out
its timeouts (two of 120 s in the kill-and-resume deployment test, in about half of
the runs). Here that exception, raised while the message's content is fetched or
confirmed, is re-raised as :class:`RunStopped`, an ``Exception``, so Flower's own
clean-up runs: the message and its objects are deleted and the task finished FAILED.

Both patches are tied to Flower 1.39's module, as the pin is (``flwr>=1.39,<1.40``);
if the module no longer sleeps those exact values the waits are Flower's own, and a
test checks that the unpatched loop still has the bug (when it fails, drop the mend).
"""

from __future__ import annotations

import functools
import inspect
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


class RunStopped(Exception):
    """The run stopped while a pulled message was being received (``RunNotRunningException``)."""


_RECEIVING = ("pull_object", "confirm_message_received")
"""The callables of ``_pull_and_store_message`` that run after the message is stored."""


def _stopped_as_failure(call: Callable[..., Any]) -> Callable[..., Any]:
    from flwr.supercore.run import RunNotRunningException

    @functools.wraps(call)
    def receiving(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except RunNotRunningException as err:
            raise RunStopped("the run is no longer running") from err

    return receiving


def clean_pull(pull_and_store: Callable[..., Any]) -> Callable[..., Any]:
    """Flower's ``_pull_and_store_message``, cleaning up when the run stops mid-receive."""
    signature = inspect.signature(pull_and_store)

    @functools.wraps(pull_and_store)
    def pull_and_store_message(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        for name in _RECEIVING:
            bound.arguments[name] = _stopped_as_failure(bound.arguments[name])
        return pull_and_store(*bound.args, **bound.kwargs)

    pull_and_store_message.fedlora_clean_pull = True  # type: ignore[attr-defined]
    return pull_and_store_message


def install() -> PromptClock:
    """Put a :class:`PromptClock` and :func:`clean_pull` into Flower's SuperNode loop (once)."""
    from flwr.supernode import start_client_internal

    pull: Any = start_client_internal._pull_and_store_message
    if not getattr(pull, "fedlora_clean_pull", False):
        start_client_internal._pull_and_store_message = clean_pull(pull)
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
