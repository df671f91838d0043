"""One round with bounded waits: RoundGrid's limits and bookkeeping, why SecAgg+ stopped,
the plain fit workflow with a late and a declining device, and the deadline's config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.default_workflows import default_fit_workflow

from fedlora.config import FedloraConfig
from fedlora.errors import ConfigError
from fedlora.server.budget import FleetBudget
from fedlora.server.rounds import (
    RoundGrid,
    RoundWorkflow,
    halt_reason,
    is_training_request,
    message_bytes,
    stage_of,
)
from fedlora.server.strategy import LoraFedAvg
from tests.server.fakes import FakeGrid, error, fit_reply, ok, task_identity

__all__ = ["task_identity"]  # the fixture, used by name

pytestmark = pytest.mark.usefixtures("task_identity")


def train_msg(node: int) -> Message:
    ins = FitIns(ndarrays_to_parameters([np.zeros(2, np.float32)]), {})
    content = compat.fitins_to_recorddict(ins, keep_input=True)
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id="1")


def secagg_msg(node: int, stage: str) -> Message:
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage})})
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id="1")


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------ RoundGrid
def test_every_wait_is_bounded_whatever_the_caller_asks():
    inner = FakeGrid(ok)
    grid = RoundGrid(inner, timeout_s=42.0)

    grid.send_and_receive([secagg_msg(1, "setup")])  # Flower's plain fit passes no timeout
    grid.send_and_receive([secagg_msg(1, "share_keys")], timeout=1e9)
    grid.send_and_receive([train_msg(1)])  # no deadline: training waits the timeout too

    assert [t for _, t in inner.calls] == [42.0, 42.0, 42.0]


def test_the_grid_counts_the_bytes_of_every_message_and_reply():
    """Down: each message as serialized (the training one carries the adapter); up: each
    reply, an error reply included; a device that never answers sends nothing."""

    def answer(msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        return ok(msg) if node == 1 else error(msg) if node == 2 else None

    grid = RoundGrid(FakeGrid(answer), timeout_s=42.0)
    sent = [train_msg(1), train_msg(2), train_msg(3)]
    down = sum(message_bytes(m) for m in sent)

    replies = list(grid.send_and_receive(sent))
    unmask = secagg_msg(1, "unmask")
    down += message_bytes(unmask)  # as it leaves: the grid gives it an id on the way
    replies += grid.send_and_receive([unmask])

    assert message_bytes(sent[0]) > 2 * 4  # the two float32 values, and more
    assert grid.bytes_down == down
    assert grid.bytes_up == sum(message_bytes(r) for r in replies)
    assert len(replies) == 3


def test_training_replies_wait_until_the_deadline_counted_from_the_round_start():
    clock = Clock(100.0)
    inner = FakeGrid(ok)
    grid = RoundGrid(inner, timeout_s=300.0, deadline_s=30.0, clock=clock)

    clock.now = 112.0  # setup and key sharing took 12 s
    grid.send_and_receive([secagg_msg(1, "share_keys")])
    grid.send_and_receive([train_msg(1)])
    clock.now = 131.0  # past the deadline: nothing more is waited for
    grid.send_and_receive([train_msg(2)])

    assert [t for _, t in inner.calls] == [300.0, 18.0, 0.0]


def test_late_and_lost_devices_are_counted_by_stage():
    def answer(msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        return {1: ok(msg), 2: error(msg)}.get(node)  # 3 and 4 never answer

    requested: list[set[int]] = []
    grid = RoundGrid(FakeGrid(answer), timeout_s=5.0, on_training_request=requested.append)

    grid.send_and_receive([secagg_msg(n, "share_keys") for n in (1, 2, 3)])
    replies = list(grid.send_and_receive([train_msg(n) for n in (1, 2, 3, 4)]))

    assert {r.metadata.src_node_id for r in replies} == {1, 2}
    assert requested == [{1, 2, 3, 4}]  # every device asked to train owes its spend
    assert grid.late == {3, 4}  # an error reply is a failure, not lateness
    assert dict(grid.dropouts) == {"share_keys": 2, "fit": 3}


def test_messages_are_told_apart_by_stage():
    masked = train_msg(1)
    masked.content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(
        {Key.STAGE: "collect_masked_vectors"}
    )
    assert stage_of(masked) == "collect_masked_vectors" and is_training_request(masked)
    assert stage_of(train_msg(1)) == "fit" and is_training_request(train_msg(1))
    assert stage_of(secagg_msg(1, "unmask")) == "unmask"
    assert not is_training_request(secagg_msg(1, "unmask"))


def test_a_halted_secagg_round_says_where_and_why():
    reason = halt_reason(
        "collect_masked_vectors", sampled=6, remaining=3, threshold=4, num_shares=6
    )
    assert "collect_masked_vectors" in reason and "3 of 6" in reason and "needs 4" in reason
    assert "unchanged" in reason
    assert "returned their key shares" in halt_reason(
        "unmask", sampled=6, remaining=3, threshold=4, num_shares=6
    )
    assert "at least 2" in halt_reason("setup", sampled=1, remaining=1, threshold=2, num_shares=1)


# ------------------------------------------------------------ a plain round, end to end
SHAPES = [(4, 3), (3,)]
NODES = {1: ("d1", 50), 2: ("d2", 80), 3: ("d3", 64)}
SIGMA = 3.0


def _strategy(tmp_path: Path) -> LoraFedAvg:
    cfg = FedloraConfig().replace(
        secagg={"enabled": False},
        privacy={"max_update_norm": 2.0, "noise_multiplier": SIGMA},
        training={"local_steps": 10, "batch_size": 16, "rounds": 5, "round_deadline_s": 30.0},
        fleet={"num_devices": 4, "devices_per_round": 3, "min_devices": 1},
    )
    budget = FleetBudget(cfg.privacy, steps_per_round=10, batch_size=16)
    for node, (device, records) in NODES.items():
        budget.register(node, {"device": device, "num_records": records})
    initial = [np.zeros(s, np.float32) for s in SHAPES]
    return LoraFedAvg(
        cfg,
        initial_arrays=initial,
        names=["lora_A", "lora_B"],
        evaluator=lambda arrays: 1.0,
        budget=budget,
        run_dir=tmp_path,
        run_id="7",
    )


def _fit_res(node: int, value: float) -> FitRes:
    device, records = NODES[node]
    metrics: dict[str, Any] = {
        "device": device,
        "round": 1,
        "run": "7",
        "dp": True,
        "noise_multiplier": SIGMA,
        "sample_rate": min(1.0, 16 / records),
        "steps": 10,
        "delta": 1e-5,
        "train_s": 1.5,
    }
    arrays = [np.full(s, value, np.float32) for s in SHAPES]
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), records, metrics)


def test_a_plain_round_drops_the_late_device_and_counts_it(tmp_path):
    """Node 1 answers, node 2 declines for its budget, node 3 never answers by the deadline:
    the aggregate is node 1's update alone; node 3's spend is owed, node 2's is settled."""
    strategy = _strategy(tmp_path)
    budget = strategy.budget
    manager = SimpleClientManager()
    grid = FakeGrid(ok)  # replaced below, once proxies exist
    for node in NODES:
        manager.register(GridClientProxy(node, grid, run_id=7))

    def answer(msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        if node == 1:
            return fit_reply(msg, _fit_res(1, 0.25))
        if node == 2:
            return error(msg, "device d2 declines round 1: it would reach ε=9 > budget 8")
        return None

    grid.answer = answer
    context = LegacyContext(
        Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=5),
        strategy=strategy,
        client_manager=manager,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(strategy.global_arrays), keep_input=True
    )

    def expect(rnd: int, nodes: set[int]) -> None:
        for n in nodes:
            budget.expect(n, rnd)

    workflow = RoundWorkflow(
        default_fit_workflow,
        strategy,
        timeout_s=300.0,
        deadline_s=30.0,
        on_training_request=expect,
    )
    workflow(grid, context)
    strategy.evaluate(1, ndarrays_to_parameters(strategy.global_arrays))

    row = strategy.rows[-1]
    assert (row["sampled"], row["num_devices"], row["late"]) == (3, 1, 1)
    assert (row["failures"], row["declined"]) == (1, 1)
    assert row["dropouts"] == {"fit": 2}
    assert grid.calls[0][1] == pytest.approx(30.0, abs=1.0)  # the deadline, not forever
    new = parameters_to_ndarrays(
        compat.arrayrecord_to_parameters(
            context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
        )
    )
    np.testing.assert_allclose(new[0], 0.25)  # node 1's update alone
    assert budget.owed == {3: {1}} and row["unreconciled"] == 1
    # what the round cost: node 1's reply says how long it trained; bytes both ways
    assert (row["train_s_total"], row["train_s_max"]) == (1.5, 1.5)
    assert row["framework_s"] == pytest.approx(max(0.0, row["round_s"] - 1.5))
    assert row["bytes_down"] > 3 * 2 * 4 and row["bytes_up"] > 0
    assert row["bytes_down_per_device"] == pytest.approx(row["bytes_down"] / 3)
    assert row["bytes_up_per_device"] == pytest.approx(row["bytes_up"] / 3)
    assert budget.ledger.rounds_for("d1") == (1,) and budget.ledger.rounds_for("d2") == ()


# ------------------------------------------------------------ config
@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan")])
def test_a_round_deadline_must_be_a_positive_number_of_seconds(value):
    with pytest.raises(ConfigError, match="round_deadline_s must be a positive") as info:
        FedloraConfig.from_dict({"training": {"round_deadline_s": value}})
    assert "\n" not in str(info.value)


def test_a_round_deadline_is_optional_and_round_trips():
    assert FedloraConfig().training.round_deadline_s is None
    cfg = FedloraConfig.from_dict({"training": {"round_deadline_s": 45}})
    assert cfg.training.round_deadline_s == 45.0
    assert FedloraConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="must be a number"):
        FedloraConfig.from_dict({"training": {"round_deadline_s": "45"}})


@pytest.mark.parametrize("value", [0, float("inf")])
def test_the_secagg_timeout_must_be_finite(value):
    with pytest.raises(ConfigError, match="timeout_s must be a positive"):
        FedloraConfig.from_dict({"secagg": {"timeout_s": value}})
