"""fedlora.testing.faults: the fault mod alters or drops a reply as planned, the coordinator's
strategy rejects every malformed kind for the reason the mod names, and random plans are
seeded and keep to their rates."""

from __future__ import annotations

import json
import time
from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
import pytest
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import Error
from flwr.common.constant import ErrorCode

from fedlora.testing.faults import (
    CLAIM_KINDS,
    MALFORMED,
    MASKED_STAGE,
    SECAGG_STAGES,
    Fault,
    InjectedFault,
    fault_mod,
    random_faults,
)
from tests.server.test_strategy_rejects import aggregate, make_strategy, proxy, result

NODE = 2  # a node of test_strategy_rejects' fleet; its partition id here too


def _request(rnd: int = 1) -> Message:
    meta = Metadata(
        run_id=7,
        message_id=f"m{rnd}",
        src_node_id=0,
        dst_node_id=NODE,
        reply_to_message_id="",
        group_id=str(rnd),
        created_at=time.time(),
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    # (the typed overloads omit `metadata`, which builds a message outside a running app)
    return Message(content=RecordDict(), metadata=meta)  # type: ignore[call-overload]


def _context() -> Context:
    return Context(
        run_id=7,
        node_id=NODE,
        node_config={"partition-id": NODE},
        state=RecordDict(),
        run_config={},
    )


def _honest_reply(msg: Message, _ctxt: Context) -> Message:
    _, res = result(NODE)
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_each_malformed_reply_is_rejected_for_the_reason_it_names(kind, tmp_path: Path) -> None:
    log = tmp_path / "faults.jsonl"
    fault = Fault(partition=NODE, round=1, stage="fit", action="malformed", kind=kind)
    mod = fault_mod([fault], log=log)

    reply = mod(_request(), _context(), _honest_reply)
    res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    _, row = aggregate(make_strategy(tmp_path), [result(1), (proxy(NODE), res), result(3)])

    assert row["rejected_by_reason"] == {fault.reason: 1}
    assert row["num_devices"] == 2
    entry = json.loads(log.read_text())
    assert (entry["kind"], entry["applied"], entry["round"]) == (kind, True, 1)


def test_an_honest_reply_passes_and_other_rounds_are_untouched(tmp_path: Path) -> None:
    fault = Fault(partition=NODE, round=2, stage="fit", action="malformed", kind="nan")
    log = tmp_path / "faults.jsonl"

    reply = fault_mod([fault], log=log)(_request(rnd=1), _context(), _honest_reply)
    res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    _, row = aggregate(make_strategy(tmp_path), [result(1), (proxy(NODE), res), result(3)])

    assert row["rejected_by_reason"] == {} and row["num_devices"] == 3
    assert not log.exists()


def test_a_declined_reply_is_passed_on_unaltered_and_logged_as_not_applied(tmp_path) -> None:
    log = tmp_path / "faults.jsonl"
    fault = Fault(partition=NODE, round=1, stage="fit", action="malformed", kind="round")
    error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="device d2 declines round 1")

    def declines(msg: Message, _ctxt: Context) -> Message:
        return Message(error, reply_to=msg)

    reply = fault_mod([fault], log=log)(_request(), _context(), declines)

    assert reply.has_error() and reply.error.reason == error.reason
    assert json.loads(log.read_text())["applied"] is False


@pytest.mark.parametrize("action", ["crash_before", "crash_after"])
def test_dropouts_raise_before_or_after_the_device_ran(action, tmp_path: Path) -> None:
    ran: list[int] = []

    def device(msg: Message, ctxt: Context) -> Message:
        ran.append(1)
        return _honest_reply(msg, ctxt)

    mod = fault_mod([Fault(partition=NODE, round=1, stage="fit", action=action)])
    with pytest.raises(InjectedFault, match=f"{action.split('_')[1]} device {NODE}, round 1"):
        mod(_request(), _context(), device)
    assert ran == ([] if action == "crash_before" else [1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"action": "explode"}, "unknown fault action"),
        ({"action": "crash_before", "stage": "evaluate"}, "unknown stage"),
        ({"action": "malformed"}, "needs a kind"),
        ({"action": "crash_after", "kind": "nan"}, "needs a kind"),
        ({"action": "malformed", "kind": "gibberish"}, "unknown malformed kind"),
        ({"action": "malformed", "kind": "nan", "stage": MASKED_STAGE}, "only at fit"),
        ({"action": "malformed", "kind": "round", "stage": "unmask"}, "fit or collect"),
    ],
)
def test_impossible_faults_are_refused(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        Fault(**{"partition": 0, "round": 1, "stage": "fit", **kwargs})


def test_random_plans_are_seeded_and_keep_to_their_rates() -> None:
    def plan(seed: int) -> list[Fault]:
        return random_faults(100, 20, dropout_rate=0.2, malformed_rate=0.05, secagg=True, seed=seed)

    a, b, other = plan(0), plan(0), plan(1)
    drops = [f for f in a if f.action != "malformed"]
    bad = [f for f in a if f.action == "malformed"]

    assert a == b and a != other
    assert 0.17 < len(drops) / 2000 < 0.23 and 0.03 < len(bad) / 2000 < 0.07
    assert {f.stage for f in drops} == set(SECAGG_STAGES)
    assert {f.action for f in drops} == {"crash_before", "crash_after"}
    assert {f.kind for f in bad} == set(CLAIM_KINDS) and {f.stage for f in bad} == {MASKED_STAGE}
    assert len({(f.partition, f.round) for f in a}) == len(a)  # one fault per device-round


def test_plain_plans_use_fit_and_every_kind_and_bad_arguments_are_refused() -> None:
    plan = random_faults(50, 20, dropout_rate=0.1, malformed_rate=0.3, secagg=False, seed=3)

    assert {f.stage for f in plan} == {"fit"}
    assert {f.kind for f in plan if f.kind} == set(MALFORMED)
    with pytest.raises(ValueError, match="sum to at most 1"):
        random_faults(5, 2, dropout_rate=0.8, malformed_rate=0.3, secagg=False, seed=0)
    with pytest.raises(ValueError, match="must be among"):
        random_faults(
            5, 2, dropout_rate=0.1, malformed_rate=0.1, secagg=True, seed=0, kinds=["nan"]
        )
