"""ReportingSecAggPlus against real SecAgg+ devices, in process: a dropout at every stage.

Six nodes run Flower's own ``secaggplus_mod`` (real key agreement, Shamir shares,
masking) around a stub training step that returns a fixed update, behind a scripted
grid. With every node holding a share of every secret and a threshold of 4, two
dropouts at any stage are survived and three are not: the survivors' weighted mean
comes out, or the strategy hears where and why the round stopped, with the training
replies that arrived.
"""

from __future__ import annotations

from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedlora.server.aggregate import weighted_mean
from fedlora.server.rounds import ReportingSecAggPlus, RoundGrid, stage_of
from tests.server.fakes import FakeGrid, error, task_identity

__all__ = ["task_identity"]

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = (11, 12, 13, 14, 15, 16)
WEIGHTS = dict(zip(NODES, (10, 20, 30, 40, 50, 60), strict=True))
STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")
CLIP, Q = 8.0, 2**22


def _update(node: int) -> list[np.ndarray]:
    rng = np.random.default_rng(node)
    return [
        rng.uniform(-1, 1, (3,)).astype(np.float32),
        rng.uniform(-1, 1, (2, 2)).astype(np.float32),
    ]


class StubStrategy:
    """What SecAggPlusWorkflow asks of a strategy: whom to sample, and the aggregate."""

    def __init__(self, grid: FakeGrid) -> None:
        self.grid = grid
        self.aggregated: list[tuple[list[Any], list[Any]]] = []

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any):
        return [(GridClientProxy(n, self.grid, 7), FitIns(parameters, {})) for n in NODES]

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]):
        self.aggregated.append((results, failures))
        return None, {}


def run_round(drops: dict[int, str], *, silent: bool = False, deadline_s: float | None = None):
    """One SecAgg+ round where node n drops out at stage ``drops[n]``; returns
    (strategy, halts, round grid)."""
    contexts = {
        n: Context(run_id=7, node_id=n, node_config={}, state=RecordDict(), run_config={})
        for n in NODES
    }

    def train(msg: Message, ctxt: Context) -> Message:
        node = msg.metadata.dst_node_id
        res = FitRes(
            Status(Code.OK, ""),
            ndarrays_to_parameters(_update(node)),
            WEIGHTS[node],
            {"device": f"d{node}"},
        )
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    def answer(msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        if drops.get(node) == stage_of(msg):
            return None if silent else error(msg, f"node {node} dropped out")
        return secaggplus_mod(msg, contexts[node], train)

    grid = FakeGrid(answer)
    strategy = StubStrategy(grid)
    halts: list[tuple[int, str, list[Any], list[BaseException]]] = []
    workflow = ReportingSecAggPlus(
        1.0,
        0.6,
        max_weight=60.0,
        clipping_range=CLIP,
        quantization_range=Q,
        timeout=5.0,
        on_halt=lambda *args: halts.append(args),
    )
    context = LegacyContext(
        Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,  # type: ignore[arg-type]
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros(3, np.float32), np.zeros((2, 2), np.float32)]), True
    )
    round_grid = RoundGrid(grid, timeout_s=5.0, deadline_s=deadline_s)
    workflow(round_grid, context)
    return strategy, halts, round_grid


def _tolerance(nodes: list[int]) -> float:
    step = 2 * CLIP / (Q - 1)
    return len(nodes) * step * 60.0 / sum(WEIGHTS[n] for n in nodes) + 1e-6


def _assert_mean_of(strategy: StubStrategy, nodes: list[int]) -> None:
    ((results, _),) = strategy.aggregated
    assert sorted(p.node_id for p, _ in results) == nodes
    got = parameters_to_ndarrays(results[0][1].parameters)
    want = weighted_mean([(_update(n), WEIGHTS[n]) for n in nodes])
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    assert diff <= _tolerance(nodes)


def test_no_dropouts_give_the_weighted_mean():
    strategy, halts, grid = run_round({})
    assert halts == [] and dict(grid.dropouts) == {}
    _assert_mean_of(strategy, list(NODES))


@pytest.mark.parametrize("stage", STAGES)
def test_two_dropouts_at_any_stage_are_survived(stage):
    strategy, halts, grid = run_round({12: stage, 15: stage})

    assert halts == []
    assert dict(grid.dropouts) == {stage: 2}
    # A device lost at unmask had already sent its masked update: it is in the sum, and
    # the others' shares rebuild its mask.
    in_sum = list(NODES) if stage == "unmask" else [11, 13, 14, 16]
    _assert_mean_of(strategy, in_sum)
    ((_, failures),) = strategy.aggregated
    assert len(failures) == 2  # each error reply once


@pytest.mark.parametrize("stage", STAGES)
def test_three_dropouts_stop_the_round_and_say_where(stage):
    strategy, halts, grid = run_round({11: stage, 13: stage, 16: stage})

    assert strategy.aggregated == []  # no aggregate: the global adapter is not touched
    ((rnd, reason, results, failures),) = halts
    assert rnd == 1 and f"at its {stage} stage" in reason and "needs 4" in reason
    assert "3 of 6" in reason
    trained = {"setup": [], "share_keys": [], "collect_masked_vectors": [12, 14, 15]}
    # The training replies that arrived carry the devices' privacy events.
    assert sorted(p.node_id for p, _ in results) == trained.get(stage, list(NODES))
    assert len(failures) == 3
    assert dict(grid.dropouts) == {stage: 3}


def test_a_silent_device_at_the_training_stage_is_late():
    strategy, halts, grid = run_round({14: "collect_masked_vectors"}, silent=True)
    assert halts == [] and grid.late == {14}
    _assert_mean_of(strategy, [11, 12, 13, 15, 16])
