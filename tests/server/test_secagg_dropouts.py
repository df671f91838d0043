"""fedlora's SecAgg+ against real SecAgg+ devices, in process: a dropout at every stage.

Six nodes run fedlora's SecAgg+ mod (:mod:`fedlora.client.secagg`: Flower's key
agreement and Shamir shares, ChaCha20 masks, uint32 payloads) around a stub training
step that returns a fixed update, behind a scripted grid, talking to
:class:`fedlora.server.secagg.FedloraSecAggPlus` (which keeps ReportingSecAggPlus' graph
sizing and dropout fixes). With every node holding a share of every secret and a threshold of 4, two
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
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedlora.client.secagg import fedlora_secaggplus_mod
from fedlora.privacy.noise import SeededRandom
from fedlora.server.aggregate import weighted_mean
from fedlora.server.rounds import RoundGrid, stage_of
from fedlora.server.secagg import FedloraSecAggPlus, Screen
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

    def __init__(self, grid: FakeGrid, nodes: tuple[int, ...] = NODES) -> None:
        self.grid = grid
        self.nodes = nodes
        self.aggregated: list[tuple[list[Any], list[Any]]] = []

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any):
        return [(GridClientProxy(n, self.grid, 7), FitIns(parameters, {})) for n in self.nodes]

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]):
        self.aggregated.append((results, failures))
        return None, {}


def _weight(node: int) -> int:
    return WEIGHTS.get(node, 10 + node % 50)


def run_round(
    drops: dict[int, str],
    *,
    silent: bool = False,
    deadline_s: float | None = None,
    nodes: tuple[int, ...] = NODES,
    shares: tuple[float | None, float | None] = (1.0, 0.6),
    dropout_rate: float = 0.1,
    workflow_out: list[FedloraSecAggPlus] | None = None,
    screen: Screen | None = None,
    reply: Any = None,
):
    """One SecAgg+ round of ``nodes`` (k and t from ``shares`` and ``dropout_rate``) where
    node n drops out at stage ``drops[n]``; ``screen`` is the strategy's claim check and
    ``reply(node, reply)`` may alter a device's reply; returns (strategy, halts, round grid)."""
    contexts = {
        n: Context(run_id=7, node_id=n, node_config={}, state=RecordDict(), run_config={})
        for n in nodes
    }

    def train(msg: Message, ctxt: Context) -> Message:
        node = msg.metadata.dst_node_id
        res = FitRes(
            Status(Code.OK, ""),
            ndarrays_to_parameters(_update(node)),
            _weight(node),
            {"device": f"d{node}"},
        )
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    def answer(msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        if drops.get(node) == stage_of(msg):
            return None if silent else error(msg, f"node {node} dropped out")
        try:
            out = secaggplus(msg, contexts[node], train)
        except Exception as exc:  # as Flower's engine does: the device answers with an error
            return error(msg, f"{type(exc).__name__}: {exc}")
        return out if reply is None else reply(node, out)

    secaggplus = fedlora_secaggplus_mod(lambda ctxt, rnd: SeededRandom(ctxt.node_id * 1000 + rnd))
    grid = FakeGrid(answer)
    strategy = StubStrategy(grid, nodes)
    halts: list[tuple[int, str, list[Any], list[BaseException]]] = []
    workflow = FedloraSecAggPlus(
        *shares,
        dropout_rate=dropout_rate,
        max_weight=60.0,
        clipping_range=CLIP,
        quantization_range=Q,
        timeout=5.0,
        on_halt=lambda *args: halts.append(args),
        screen=screen,
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
    if workflow_out is not None:
        workflow_out.append(workflow)
    return strategy, halts, round_grid


def _tolerance(nodes: list[int]) -> float:
    step = 2 * CLIP / (Q - 1)
    return len(nodes) * step * 60.0 / sum(_weight(n) for n in nodes) + 1e-6


def _assert_mean_of(strategy: StubStrategy, nodes: list[int]) -> None:
    ((results, _),) = strategy.aggregated
    assert sorted(p.node_id for p, _ in results) == nodes
    got = parameters_to_ndarrays(results[0][1].parameters)
    want = weighted_mean([(_update(n), _weight(n)) for n in nodes])
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


# ---------------------------------------------------------------- the sparse graph


def _thirty_percent(nodes: tuple[int, ...]) -> dict[int, str]:
    """30% of ``nodes`` (seeded) dropping out at every stage, before and after key sharing."""
    lost = np.random.default_rng(30).choice(nodes, 3 * len(nodes) // 10, replace=False)
    stages = [STAGES[i * len(STAGES) // len(lost)] for i in range(len(lost))]
    return dict(zip(lost.tolist(), stages, strict=True))


@pytest.mark.parametrize(
    ("n", "dropout_rate", "graph"),
    [
        # δ = 0.1 at 50: 33 share holders, majority 17. Any 15 dropouts leave each device
        # at least 32 - 15 = 17 of its other holders, so the round completes whatever
        # ring Flower's shuffle draws.
        (50, 0.1, (33, 17)),
        # δ = 0.2 at 100: 75 holders, majority 38; any 30 dropouts leave >= 74 - 30 = 44.
        pytest.param(
            100, 0.2, (75, 38), marks=[pytest.mark.slow, pytest.mark.scale]
        ),  # ~3 min on 2 cores
        # δ = 0.3 needs every device at 100 (see secagg_graph): the full graph, t = 51.
        pytest.param(100, 0.3, (100, 51), marks=[pytest.mark.slow, pytest.mark.scale]),  # ~5 min
    ],
)
def test_thirty_percent_dropouts_give_the_survivors_mean(n, dropout_rate, graph):
    nodes = tuple(range(101, 101 + n))
    drops = _thirty_percent(nodes)
    workflows: list[FedloraSecAggPlus] = []

    strategy, halts, grid = run_round(
        drops, nodes=nodes, shares=(None, None), dropout_rate=dropout_rate,
        workflow_out=workflows,
    )  # fmt: skip

    assert workflows[0].graph == graph
    assert halts == [] and sum(grid.dropouts.values()) == len(drops) == 3 * n // 10
    # Lost at unmask: the masked update is in; everyone else lost never sent one.
    in_sum = sorted(p for p in nodes if drops.get(p, "unmask") == "unmask")
    assert len(in_sum) == n - len(drops) + list(drops.values()).count("unmask")
    _assert_mean_of(strategy, in_sum)


def test_the_full_graph_stays_available_and_means_what_it_meant():
    workflows: list[FedloraSecAggPlus] = []

    run_round({}, shares=(1.0, 0.6), workflow_out=workflows)

    assert workflows[0].graph == (6, 4)  # round(0.6 · 6): as Flower 1.39 sizes it


# ---------------------------------------------------------------- liars


def _unmask_lists(grid: RoundGrid) -> tuple[set[int], set[int]]:
    """(every node id some device was asked for a seed share of, ... for a key share of)."""
    fake = grid._grid
    assert isinstance(fake, FakeGrid)
    seeds: set[int] = set()
    keys: set[int] = set()
    for msgs, _ in fake.calls:
        for msg in msgs:
            if stage_of(msg) != "unmask":
                continue
            cfg = msg.content.config_records[RECORD_KEY_CONFIGS]
            seeds |= set(cfg[Key.ACTIVE_NODE_ID_LIST])  # type: ignore[arg-type]
            keys |= set(cfg[Key.DEAD_NODE_ID_LIST])  # type: ignore[arg-type]
    return seeds, keys


def test_one_liar_of_twenty_costs_only_its_update():
    nodes = tuple(range(201, 221))
    liar = 207
    screened: list[list[int]] = []

    def screen(rnd: int, results: list[Any], malformed: Any) -> set[int]:
        screened.append(sorted(p.node_id for p, _ in results))
        return {liar}

    workflows: list[FedloraSecAggPlus] = []
    strategy, halts, grid = run_round(
        {}, nodes=nodes, shares=(None, None), screen=screen, workflow_out=workflows
    )

    assert halts == [] and screened == [list(nodes)]  # every result, before unmasking
    assert workflows[0].liars == {liar: "its claims were rejected"}
    # The round is aggregated, not discarded: exactly the 19 honest devices' mean.
    ((results, _),) = strategy.aggregated
    got = parameters_to_ndarrays(results[0][1].parameters)
    honest = [n for n in nodes if n != liar]
    want = weighted_mean([(_update(n), _weight(n)) for n in honest])
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    assert diff <= _tolerance(honest)
    with_liar = weighted_mean([(_update(n), _weight(n)) for n in nodes])
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, with_liar, strict=True)) > 100 * diff
    # Its neighbours gave up its key's shares (its pairwise masks), never its seed's.
    seeds, keys = _unmask_lists(grid)
    assert liar in keys and liar not in seeds


def test_a_payload_of_the_wrong_size_is_refused_and_left_out():
    """A device speaking Flower's SecAgg+ (int64 .npy arrays) or sending any other size."""
    from flwr.common import ndarray_to_bytes

    def old_format(node: int, out: Message) -> Message:
        cfg = out.content.config_records[RECORD_KEY_CONFIGS]
        if node == 13 and Key.MASKED_PARAMETERS in cfg:
            cfg[Key.MASKED_PARAMETERS] = [
                ndarray_to_bytes(np.zeros(s, np.int64)) for s in [(1,), (3,), (2, 2)]
            ]
        return out

    workflows: list[FedloraSecAggPlus] = []
    strategy, halts, grid = run_round({}, reply=old_format, workflow_out=workflows)

    assert halts == []
    assert "masked array 0 is" in workflows[0].liars[13]
    _assert_mean_of_sum(strategy, [11, 12, 14, 15, 16])
    assert 13 in _unmask_lists(grid)[1] and 13 not in _unmask_lists(grid)[0]


def _assert_mean_of_sum(strategy: StubStrategy, nodes: list[int]) -> None:
    ((results, _),) = strategy.aggregated
    got = parameters_to_ndarrays(results[0][1].parameters)
    want = weighted_mean([(_update(n), _weight(n)) for n in nodes])
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    assert diff <= _tolerance(nodes)


def test_masked_vectors_travel_at_four_bytes_a_value():
    sizes: list[int] = []

    def measure(node: int, out: Message) -> Message:
        blobs = out.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS)
        if blobs is not None:
            sizes.append(sum(len(b) for b in blobs))  # type: ignore[union-attr]
        return out

    run_round({}, reply=measure)

    assert sizes == [4 * (1 + 3 + 4)] * len(NODES)  # the weight, then 7 values: uint32


# ---------------------------------------------------------------- the device's checks


def test_a_stage_out_of_order_is_refused_by_the_device():
    from flwr.app.message_type import MessageType
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    mod = fedlora_secaggplus_mod(lambda ctxt, rnd: SeededRandom(rnd))
    ctxt = Context(run_id=7, node_id=11, node_config={}, state=RecordDict(), run_config={})
    record = ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS})
    msg = Message(
        content=RecordDict({RECORD_KEY_CONFIGS: record}),
        dst_node_id=11,
        message_type=MessageType.TRAIN,
        group_id="1",
    )

    with pytest.raises(ValueError, match="expect setup stage, but receive collect_masked_vectors"):
        mod(msg, ctxt, lambda m, c: m)


def test_a_key_share_altered_in_transit_is_refused_by_its_receiver():
    """The coordinator relays the sealed shares; one it alters does not open, and its
    receiver drops out of the round rather than mask with a share it cannot trust."""

    def tamper(node: int, out: Message) -> Message:
        cfg = out.content.config_records[RECORD_KEY_CONFIGS]
        if node == 11 and Key.CIPHERTEXT_LIST in cfg:
            blobs = list(cfg[Key.CIPHERTEXT_LIST])  # type: ignore[arg-type]
            blobs[0] = blobs[0][:-1] + bytes([blobs[0][-1] ^ 1])
            cfg[Key.CIPHERTEXT_LIST] = blobs
        return out

    strategy, halts, grid = run_round({}, reply=tamper)

    assert halts == [] and dict(grid.dropouts) == {"collect_masked_vectors": 1}
    ((results, failures),) = strategy.aggregated
    assert "does not authenticate" in str(failures[0])
    _assert_mean_of_sum(strategy, sorted(p.node_id for p, _ in results))
    assert len(results) == len(NODES) - 1


def test_a_liar_still_gives_its_neighbours_shares_at_unmask():
    """k = 6, t = 4: a liar out of the sum and two devices lost at unmask leave three
    survivors' shares, one short of t; the liar's own shares of the others make four."""
    strategy, halts, grid = run_round(
        {13: "unmask", 14: "unmask"}, screen=lambda rnd, results, malformed: {12}
    )

    assert halts == [] and dict(grid.dropouts) == {"unmask": 2}
    _assert_mean_of_sum(strategy, [11, 13, 14, 15, 16])  # 13, 14: their vectors are in
    seeds, keys = _unmask_lists(grid)
    assert 12 in keys and 12 not in seeds
