"""The coordinator's ledger learns a device's spend from the device's own ledger when the
training reply never came: what it records, what it refuses, and whom it asks when."""

from __future__ import annotations

from typing import Any

import pytest
from flwr.app import Message
from flwr.common.constant import MessageTypeLegacy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.config import FedloraConfig
from fedlora.privacy import DPSGDEvent
from fedlora.privacy.spend import EVENTS_KEY, QUERY_KEY, RUNS_KEY, encode_events
from fedlora.server.budget import FleetBudget
from fedlora.server.reconcile import LedgerReconciler
from tests.server.fakes import FakeGrid, error, properties_reply, task_identity

__all__ = ["task_identity"]

pytestmark = pytest.mark.usefixtures("task_identity")

RUN = "7"
SIGMA = 2.0
NODES = {1: ("d1", 40), 2: ("d2", 80), 3: ("d3", 160)}


def make(rounds: int = 5, **privacy: Any) -> tuple[FedloraConfig, FleetBudget, LedgerReconciler]:
    cfg = FedloraConfig().replace(
        training={"rounds": rounds, "local_steps": 4, "batch_size": 8},
        privacy={"noise_multiplier": SIGMA, **privacy},
    )
    budget = FleetBudget(cfg.privacy, steps_per_round=4, batch_size=8)
    for node, (device, records) in NODES.items():
        budget.register(node, {"device": device, "num_records": records})
    return cfg, budget, LedgerReconciler(cfg, budget, run_id=RUN)


def event(node: int, rnd: int, **changes: Any) -> DPSGDEvent:
    device, records = NODES[node]
    fields: dict[str, Any] = {
        "device": device,
        "round": rnd,
        "noise_multiplier": SIGMA,
        "sample_rate": 8 / records,
        "steps": 4,
        "delta": 1e-5,
        "run": RUN,
    }
    fields.update(changes)
    return DPSGDEvent(**fields)


def answering(ledgers: dict[int, list[DPSGDEvent]], **raw: Any):
    """Each node answers a ledger query with its events (or ``raw[node]`` as the text)."""
    asked: list[int] = []

    def answer(msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        asked.append(node)
        assert msg.metadata.message_type == MessageTypeLegacy.GET_PROPERTIES
        if node not in ledgers and f"n{node}" not in raw:
            return None
        text = raw.get(f"n{node}", encode_events(ledgers.get(node, [])))
        return properties_reply(msg, {"device": NODES[node][0], EVENTS_KEY: text})

    return answer, asked


def test_a_dropped_device_reports_its_round_and_it_is_recorded_once():
    _, budget, reconciler = make()
    budget.add(1, event(1, 1))  # round 1 came with its update
    for node in (1, 2):
        budget.expect(node, 2)
    answer, asked = answering({1: [event(1, 1), event(1, 2)], 2: [event(2, 2)]})
    grid = FakeGrid(answer)

    assert reconciler.reconcile(grid) == 2

    assert sorted(asked) == [1, 2] and budget.owed == {}
    assert budget.ledger.rounds_for("d1") == (1, 2)  # round 1 not counted twice
    assert budget.ledger.rounds_for("d2") == (2,)
    assert grid.calls[0][1] == reconciler.cfg.secagg.timeout_s  # a bounded wait
    query = grid.calls[0][0][0]
    assert query.content.config_records["getpropertiesins.config"][QUERY_KEY] is True


def test_a_round_the_device_does_not_report_was_not_spent():
    """It declined or dropped out before training: its own ledger has nothing."""
    _, budget, reconciler = make()
    budget.expect(3, 1)
    answer, _ = answering({3: []})

    assert reconciler.reconcile(FakeGrid(answer)) == 0
    assert budget.owed == {} and len(budget.ledger) == 0


def test_nobody_is_asked_when_nothing_is_owed():
    _, _, reconciler = make()
    grid = FakeGrid(lambda m: pytest.fail("asked"))
    assert reconciler.reconcile(grid) == 0 and grid.calls == []


@pytest.mark.parametrize(
    "reported",
    [
        event(1, 3),  # a round it was never asked to train
        event(1, 1, run="6"),  # another run
        event(1, 1, device="d2", sample_rate=0.1),  # another device's round
        event(1, 1, steps=40),  # more steps than the run's devices take
        event(1, 1, noise_multiplier=0.5),  # not the run's fixed σ
        event(1, 1, sample_rate=0.5),  # not q = B / n for its record count
        event(1, 1, delta=1e-3),  # not the run's δ
    ],
)
def test_an_event_the_device_could_not_have_spent_here_is_not_recorded(reported):
    _, budget, reconciler = make()
    budget.expect(1, 1)
    answer, _ = answering({1: [reported]})

    assert reconciler.reconcile(FakeGrid(answer)) == 0
    assert len(budget.ledger) == 0
    assert budget.owed == {}  # its answer is read: asking again would get the same


def test_an_event_past_the_devices_budget_is_not_recorded():
    _, budget, reconciler = make(epsilon=0.5)
    budget.expect(1, 1)
    answer, _ = answering({1: [event(1, 1, sample_rate=1.0)]})
    budget.num_records["d1"] = 8  # q = 1 at σ = 2 for 4 steps is ε > 0.5
    assert reconciler.reconcile(FakeGrid(answer)) == 0 and len(budget.ledger) == 0


@pytest.mark.parametrize(
    "text",
    ["not json", "{}", '{"a": 1}', "[1, 2]", '[{"device": "d1"}]', "[" * 5000, 5, b"[]"],
)
def test_an_unreadable_report_settles_nothing_and_is_asked_again(text):
    _, budget, reconciler = make()
    budget.expect(1, 1)
    answer, asked = answering({}, n1=text)

    assert reconciler.reconcile(FakeGrid(answer)) == 0
    assert budget.owed == {1: {1}}
    reconciler.reconcile(FakeGrid(answer))
    assert asked == [1, 1]  # it answered, so it is asked at the next round too


def test_a_report_longer_than_the_run_is_refused():
    _, budget, reconciler = make(rounds=2)
    budget.expect(1, 1)
    answer, _ = answering({1: [event(1, 1), event(1, 2), event(1, 3)]})
    assert reconciler.reconcile(FakeGrid(answer)) == 0 and budget.owed == {1: {1}}


def test_a_node_that_does_not_answer_is_asked_again_only_at_the_end():
    _, budget, reconciler = make()
    budget.expect(2, 1)
    silent, asked = answering({})
    assert reconciler.reconcile(FakeGrid(silent)) == 0
    budget.expect(1, 2)  # round 2: another node owes
    answer, asked = answering({1: [event(1, 2)], 2: [event(2, 1)]})

    reconciler.reconcile(FakeGrid(answer))
    assert asked == [1]  # the silent node costs no second wait mid-run
    reconciler.reconcile(FakeGrid(answer), final=True)
    assert asked == [1, 2] and budget.owed == {}
    assert budget.ledger.rounds_for("d2") == (1,)


def test_an_error_reply_is_no_answer():
    _, budget, reconciler = make()
    budget.expect(1, 1)
    assert reconciler.reconcile(FakeGrid(error)) == 0
    assert budget.owed == {1: {1}} and reconciler.unreachable == {1}


def test_a_node_that_names_another_device_is_ignored():
    _, budget, reconciler = make()
    budget.expect(1, 1)

    def answer(msg: Message) -> Message:
        text = encode_events([event(2, 1, sample_rate=0.1)])
        return properties_reply(msg, {"device": "d2", EVENTS_KEY: text})

    assert reconciler.reconcile(FakeGrid(answer)) == 0
    assert len(budget.ledger) == 0 and budget.owed == {1: {1}}


def test_an_unknown_node_is_recorded_under_the_device_it_names():
    """A device that was not there at discovery (it restarted under a new node id)."""
    _, budget, reconciler = make()
    budget.expect(9, 1)
    reported = event(3, 1)

    def answer(msg: Message) -> Message:
        return properties_reply(msg, {"device": "d3", EVENTS_KEY: encode_events([reported])})

    assert reconciler.reconcile(FakeGrid(answer)) == 1
    assert budget.ledger.events_for("d3") == (reported,) and budget.node_device[9] == "d3"


def test_a_decline_settles_what_is_owed():
    _, budget, _ = make()
    budget.expect(2, 4)
    assert budget.note_failure("device d2 declines round 4: it would reach ε=9 > 8") == "d2"
    assert budget.owed == {}


def test_without_dp_nothing_is_owed():
    _, budget, _ = make(enabled=False)
    budget.expect(1, 1)
    assert budget.owed == {} and budget.num_owed() == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    props=st.dictionaries(
        st.sampled_from(["device", EVENTS_KEY, "num_records", "x"]),
        st.one_of(
            st.text(max_size=200),
            st.integers(),
            st.floats(allow_nan=True),
            st.booleans(),
            st.binary(max_size=20),
        ),
        max_size=4,
    )
)
def test_any_answer_is_handled_without_an_exception(props):
    _, budget, reconciler = make()
    budget.expect(1, 1)
    recorded = reconciler.settle(1, props)
    assert recorded == 0 and len(budget.ledger) == 0


def test_a_resumed_run_recovers_the_cut_attempts_spend_and_nothing_else():
    """After a crash the new segment (run "8") asks for the events of the earlier one ("7")."""
    _, budget, reconciler = make()
    reconciler.run_id = "8"
    budget.add(1, event(1, 1))  # committed before the crash
    ledgers = {
        # round 1 known; round 2 trained in the cut attempt; round 3 never asked for
        1: [event(1, 1), event(1, 2), event(1, 3)],
        # another run's event, and one with another device's id: neither is recorded
        2: [event(2, 2, run="5"), event(1, 2, run="7")],
        3: [event(3, 2)],
    }
    answer, asked = answering(ledgers)
    grid = FakeGrid(answer)

    counts = reconciler.recover(grid, [1, 2, 3], ["7"], up_to_round=2)

    assert sorted(asked) == [1, 2, 3]
    assert counts == {"asked": 3, "answered": 3, "recorded": 2}
    assert budget.ledger.rounds_for("d1", run="7") == (1, 2)
    assert budget.ledger.rounds_for("d2") == ()
    assert budget.ledger.rounds_for("d3", run="7") == (2,)
    query = grid.calls[0][0][0]
    assert query.content.config_records["getpropertiesins.config"][RUNS_KEY] == "7"
    # Asked again (a second resume), nothing is counted twice.
    assert reconciler.recover(FakeGrid(answer), [1, 2, 3], ["7"], up_to_round=2)["recorded"] == 0


def test_a_node_that_does_not_answer_the_resume_query_is_reported():
    _, budget, reconciler = make()
    answer, _ = answering({1: [event(1, 1)]})

    counts = reconciler.recover(FakeGrid(answer), [1, 2], ["7"], up_to_round=1)

    assert counts == {"asked": 2, "answered": 1, "recorded": 1}
    assert budget.ledger.rounds_for("d1", run="7") == (1,)
