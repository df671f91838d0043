"""A scripted Flower Grid for tests of the coordinator's round and ledger logic.

``FakeGrid(answer)`` calls ``answer(message)`` for every message sent and returns
what it returns (a reply Message, or None for "no reply in time"); it records each
``send_and_receive`` call with the timeout it was given. Messages need a task
identity in this process (the ServerApp sets one): the ``task_identity`` fixture.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any
from uuid import uuid4

import flwr.compat.common.recorddict_compat as compat
import pytest
from flwr.app import Message, RecordDict
from flwr.app.error import Error
from flwr.common import Code, FitRes, GetPropertiesRes, Status
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

Answer = Callable[[Message], "Message | None"]


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class FakeGrid(Grid):
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.calls: list[tuple[list[Message], float | None]] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        msgs = list(messages)
        self.calls.append((msgs, timeout))
        replies = []
        for msg in msgs:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            # What a node gets is its own copy, as over the wire (SecAgg+ shares one
            # content object between its messages, and its mod edits what it gets).
            reply = self.answer(copy.deepcopy(msg))
            if reply is not None:
                replies.append(reply)
        return replies

    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError


def ok(msg: Message) -> Message:
    return Message(RecordDict(), reply_to=msg)


def error(msg: Message, reason: str = "boom") -> Message:
    return Message(Error(code=0, reason=reason), reply_to=msg)


def fit_reply(msg: Message, res: FitRes) -> Message:
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def properties_reply(msg: Message, props: dict[str, Any]) -> Message:
    res = GetPropertiesRes(status=Status(code=Code.OK, message=""), properties=props)
    return Message(compat.getpropertiesres_to_recorddict(res), reply_to=msg)
