"""LoraFedAvg.aggregate_fit refuses each kind of malformed or hostile update, counts it by
reason, and the aggregate is exactly what it would have been without that update."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from flwr.common import (
    Code,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_proxy import ClientProxy

from fedlora.config import FedloraConfig
from fedlora.server.aggregate import weighted_mean
from fedlora.server.budget import FleetBudget
from fedlora.server.strategy import LoraFedAvg

SHAPES = [(4, 3), (3,)]
RUN = "7"
SIGMA = 3.0
#: node id → (device id, records) as each node reported itself at discovery.
NODES = {1: ("d1", 50), 2: ("d2", 80), 3: ("d3", 64)}
BOUND = 2.0


def make_strategy(tmp_path: Path, *, secagg: bool = False, **privacy: Any) -> LoraFedAvg:
    cfg = FedloraConfig().replace(
        secagg={"enabled": secagg},
        privacy={"max_update_norm": BOUND, **privacy},
        training={"local_steps": 10, "batch_size": 16, "rounds": 5},
        fleet={"num_devices": 4, "devices_per_round": 3, "min_devices": 3},
    )
    budget = FleetBudget(cfg.privacy, steps_per_round=10, batch_size=16)
    for node, (device, records) in NODES.items():
        budget.register(node, {"device": device, "num_records": records})
    initial = [np.full(SHAPES[0], 0.5, np.float32), np.zeros(SHAPES[1], np.float32)]
    return LoraFedAvg(
        cfg,
        initial_arrays=initial,
        names=["lora_A", "lora_B"],
        evaluator=lambda arrays: 1.25,
        budget=budget,
        run_dir=tmp_path,
        run_id=RUN,
    )


def proxy(node_id: int) -> ClientProxy:
    return cast(ClientProxy, SimpleNamespace(node_id=node_id))


def update(seed: int, scale: float = 0.1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in SHAPES]


def metrics(node: int, **changes: Any) -> dict[str, Any]:
    device, records = NODES.get(node, ("d9", 40))
    m: dict[str, Any] = {
        "device": device,
        "round": 1,
        "run": RUN,
        "dp": True,
        "noise_multiplier": SIGMA,
        "sample_rate": min(1.0, 16 / records),
        "steps": 10,
        "delta": 1e-5,
        "train_loss": 2.0,
        "clipped": False,
    }
    m.update(changes)
    return {k: v for k, v in m.items() if v is not _DROP}


_DROP = object()


def result(
    node: int,
    arrays: list[np.ndarray] | None = None,
    *,
    num_examples: int | None = None,
    parameters: Parameters | None = None,
    **metric_changes: Any,
) -> tuple[ClientProxy, FitRes]:
    records = NODES.get(node, ("d9", 40))[1]
    params = parameters or ndarrays_to_parameters(arrays if arrays is not None else update(node))
    res = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=params,
        num_examples=records if num_examples is None else num_examples,
        metrics=metrics(node, **metric_changes),
    )
    return proxy(node), res


def aggregate(strategy: LoraFedAvg, results: list[tuple[ClientProxy, FitRes]], rnd: int = 1):
    params, _ = strategy.aggregate_fit(rnd, results, [])
    row = strategy.evaluate(rnd, params or ndarrays_to_parameters(strategy.global_arrays))
    assert row is not None
    return params, strategy.rows[-1]


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _npy_pickle() -> bytes:
    """An .npy of Python objects: loading it would unpickle, which the coordinator refuses."""
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}] * 12, dtype=object).reshape(4, 3), allow_pickle=True)
    return buf.getvalue()


def _npz() -> bytes:
    """np.load returns an archive, not an array, for zip bytes."""
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros(SHAPES[0], np.float32))
    return buf.getvalue()


GOOD = update(1)
BAD: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (reason, keyword arguments of result() for node 2)
    "one tensor missing": ("tensor_count", {"arrays": GOOD[:1]}),
    "one tensor too many": ("tensor_count", {"arrays": [*GOOD, GOOD[1]]}),
    "transposed": ("shape", {"arrays": [GOOD[0].T.copy(), GOOD[1]]}),
    "other adapter rank": ("shape", {"arrays": [np.zeros((8, 3), np.float32), GOOD[1]]}),
    "oversized tensor": (
        "shape",
        {"parameters": Parameters([_npy(np.zeros(10_000, np.float32)), _npy(GOOD[1])], "numpy")},
    ),
    "float64": ("dtype", {"arrays": [a.astype(np.float64) for a in GOOD]}),
    "int32": ("dtype", {"arrays": [a.astype(np.int32) for a in GOOD]}),
    "float16": ("dtype", {"arrays": [a.astype(np.float16) for a in GOOD]}),
    "not npy bytes": ("decode", {"parameters": Parameters([b"\x93NUMPY garbage", b""], "numpy")}),
    "empty tensors": ("decode", {"parameters": Parameters([b"", b""], "numpy")}),
    "pickled object array": (
        "decode",
        {"parameters": Parameters([_npy_pickle(), _npy(GOOD[1])], "numpy")},
    ),
    "a zip archive": ("dtype", {"parameters": Parameters([_npz(), _npy(GOOD[1])], "numpy")}),
    "NaN": ("non_finite", {"arrays": [np.full(SHAPES[0], np.nan, np.float32), GOOD[1]]}),
    "+Inf": ("non_finite", {"arrays": [GOOD[0], np.array([0, np.inf, 0], np.float32)]}),
    "-Inf": ("non_finite", {"arrays": [GOOD[0], np.array([0, -np.inf, 0], np.float32)]}),
    "outside the clipping range": (
        "out_of_range",
        {"arrays": [GOOD[0], np.array([0, 65.0, 0], np.float32)]},
    ),
    "above the norm bound": ("norm", {"arrays": [np.full(SHAPES[0], 0.7, np.float32), GOOD[1]]}),
    "no device id": ("metrics", {"device": _DROP}),
    "device id not a string": ("metrics", {"device": 2}),
    "round as a string": ("metrics", {"round": "1"}),
    "round as a bool": ("metrics", {"round": True}),
    "no run": ("metrics", {"run": _DROP}),
    "no dp flag": ("metrics", {"dp": _DROP}),
    "another device's id": ("device", {"device": "d1"}),
    "another round": ("round", {"round": 2}),
    "an earlier round": ("round", {"round": 0}),
    "another run": ("run", {"run": "8"}),
    "zero examples": ("num_examples", {"num_examples": 0}),
    "negative examples": ("num_examples", {"num_examples": -5}),
    "more examples than records": ("num_examples", {"num_examples": 81}),
    "trained without DP": ("privacy_event", {"dp": False}),
    "no noise multiplier": ("privacy_event", {"noise_multiplier": _DROP}),
    "noise multiplier 1e-9": ("privacy_event", {"noise_multiplier": 1e-9}),
    "NaN noise multiplier": ("privacy_event", {"noise_multiplier": float("nan")}),
    "steps it did not take": ("privacy_event", {"steps": 10**9}),
    "another delta": ("privacy_event", {"delta": 1e-3}),
    "sample rate of another data size": ("privacy_event", {"sample_rate": 0.01}),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_bad_update_is_rejected_counted_and_leaves_the_aggregate_exactly_unchanged(
    kind: str, tmp_path: Path
) -> None:
    reason, bad = BAD[kind]
    with_bad = make_strategy(tmp_path / "with")
    without = make_strategy(tmp_path / "without")

    got, row = aggregate(with_bad, [result(1), result(2, **bad), result(3)])
    want, _ = aggregate(without, [result(1), result(3)])

    assert got is not None and want is not None
    for g, w in zip(parameters_to_ndarrays(got), parameters_to_ndarrays(want), strict=True):
        assert g.dtype == np.float32 and np.isfinite(g).all()
        np.testing.assert_array_equal(g, w)  # bit for bit
    assert row["rejected"] == 1
    assert row["rejected_by_reason"] == {reason: 1}
    assert row["num_devices"] == 2


def test_the_aggregate_is_the_weighted_mean_of_the_accepted_updates(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path)
    before = [a.copy() for a in strategy.global_arrays]

    got, row = aggregate(strategy, [result(1), result(2, round=3), result(3)])

    mean = weighted_mean([(update(1), 50), (update(3), 64)])
    expected = [b + m for b, m in zip(before, mean, strict=True)]
    for g, e in zip(parameters_to_ndarrays(got), expected, strict=True):
        np.testing.assert_array_equal(g, e)
    assert row["rejected_by_reason"] == {"round": 1} and row["num_devices"] == 2
    assert row["train_loss"] == 2.0


def test_reasons_are_counted_separately_and_a_round_of_only_bad_updates_changes_nothing(
    tmp_path: Path,
) -> None:
    strategy = make_strategy(tmp_path)
    before = [a.copy() for a in strategy.global_arrays]
    nan = [np.full(SHAPES[0], np.nan, np.float32), GOOD[1]]

    got, row = aggregate(
        strategy, [result(1, nan), result(2, round=5), result(3, nan), result(9, device=3)]
    )

    assert got is None
    assert row["rejected"] == 4
    assert row["rejected_by_reason"] == {"metrics": 1, "non_finite": 2, "round": 1}
    assert row["num_devices"] == 0
    for g, b in zip(strategy.global_arrays, before, strict=True):
        np.testing.assert_array_equal(g, b)
    assert not (tmp_path / "checkpoints").exists()


def test_a_device_that_sent_bad_tensors_still_has_its_spend_recorded(tmp_path: Path) -> None:
    """Its claims hold, so it trained: its ledger event counts even though its update does not.
    An update whose claims do not hold records nothing."""
    strategy = make_strategy(tmp_path)
    nan = [np.full(SHAPES[0], np.nan, np.float32), GOOD[1]]

    aggregate(strategy, [result(1), result(2, nan), result(3, round=2)])

    assert strategy.budget.ledger.rounds_for("d1") == (1,)
    assert strategy.budget.ledger.rounds_for("d2") == (1,)  # bad tensors, real spend
    assert strategy.budget.ledger.rounds_for("d3") == ()  # claimed another round


def test_a_replayed_update_is_refused_and_not_counted_twice(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path)
    # Node 9 was not seen at discovery (a restarted device has a new node id) and says it
    # is d1, whose round-1 update is already in: the second copy must not count.
    got, row = aggregate(strategy, [result(1), result(9, device="d1", num_examples=50)])

    assert row["rejected_by_reason"] == {"privacy_event": 1}
    assert len(strategy.budget.ledger.events_for("d1")) == 1
    assert got is not None and row["num_devices"] == 1


def test_a_device_that_missed_discovery_cannot_outweigh_the_largest_known_one(
    tmp_path: Path,
) -> None:
    strategy = make_strategy(tmp_path, enabled=False)  # no DP: no sample rate to check n by
    big = max(records for _, records in NODES.values())

    _, row = aggregate(
        strategy,
        [result(1, dp=False), result(9, dp=False, num_examples=10**9)],
    )
    assert row["rejected_by_reason"] == {"num_examples": 1}

    strategy = make_strategy(tmp_path, enabled=False)
    got, row = aggregate(strategy, [result(1, dp=False), result(9, dp=False, num_examples=big)])
    assert got is not None and row["rejected"] == 0 and row["num_devices"] == 2


def test_a_node_cannot_switch_device_ids_within_a_run(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path)
    aggregate(strategy, [result(1), result(2), result(3)], rnd=1)

    _, row = aggregate(strategy, [result(1, round=2), result(2, round=2, device="d3")], rnd=2)

    assert row["rejected_by_reason"] == {"device": 1}
    assert strategy.budget.ledger.rounds_for("d3") == (1,)  # d3's budget not charged by node 2


def test_a_fixed_sigma_run_refuses_another_sigma(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path, noise_multiplier=SIGMA)

    _, row = aggregate(strategy, [result(1), result(2, noise_multiplier=0.9), result(3)])

    assert row["rejected_by_reason"] == {"privacy_event": 1}


def test_a_round_past_the_device_budget_is_refused(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path, epsilon=1.0)

    _, row = aggregate(strategy, [result(1, noise_multiplier=0.3)])

    assert row["rejected_by_reason"] == {"privacy_event": 1}
    assert strategy.budget.ledger.events == ()


def test_a_run_without_dp_accepts_updates_without_events(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path, enabled=False)

    got, row = aggregate(strategy, [result(1, dp=False), result(2, dp=False)])

    assert got is not None and row["rejected"] == 0 and row["num_devices"] == 2


def test_clipped_updates_are_counted(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path)

    _, row = aggregate(strategy, [result(1, clipped=True), result(2), result(3, clipped=True)])

    assert row["clipped"] == 2


# ------------------------------------------------------------------ SecAgg+
def secagg_results(
    aggregate_arrays: list[np.ndarray], *changes: dict[str, Any]
) -> list[tuple[ClientProxy, FitRes]]:
    """What SecAggPlusWorkflow hands the strategy: every result carries the same float64
    aggregate; metrics and num_examples are each device's own."""
    shared = ndarrays_to_parameters(aggregate_arrays)
    out = []
    for node, change in zip(NODES, changes, strict=True):
        out.append(result(node, parameters=shared, **change))
    return out


def test_secagg_aggregate_is_applied_when_every_device_is_accepted(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path, secagg=True)
    before = [a.copy() for a in strategy.global_arrays]
    agg = [a.astype(np.float64) for a in update(5)]

    got, row = aggregate(strategy, secagg_results(agg, {}, {}, {}))

    assert got is not None and row["num_devices"] == 3 and row["rejected"] == 0
    for g, b, a in zip(parameters_to_ndarrays(got), before, agg, strict=True):
        np.testing.assert_array_equal(g, b + a.astype(np.float32))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"round": 2}, "round"),
        ({"num_examples": 10**6}, "num_examples"),
        ({"noise_multiplier": 1e-9}, "privacy_event"),
    ],
)
def test_secagg_round_with_a_rejected_device_is_discarded(
    change: dict[str, Any], reason: str, tmp_path: Path
) -> None:
    """Without screening before unmask (a workflow other than fedlora's), the rejected
    update is inside the unmasked sum and cannot be taken out of it."""
    strategy = make_strategy(tmp_path, secagg=True)
    before = [a.copy() for a in strategy.global_arrays]

    got, row = aggregate(
        strategy, secagg_results([a.astype(np.float64) for a in update(5)], {}, change, {})
    )

    assert got is None
    assert row["rejected_by_reason"] == {reason: 1} and row["num_devices"] == 0
    assert "cannot be taken out" in row["discarded"]
    for g, b in zip(strategy.global_arrays, before, strict=True):
        np.testing.assert_array_equal(g, b)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"round": 2}, "round"),
        ({"num_examples": 10**6}, "num_examples"),
        ({"noise_multiplier": 1e-9}, "privacy_event"),
    ],
)
def test_secagg_liar_screened_before_unmask_costs_only_its_update(
    change: dict[str, Any], reason: str, tmp_path: Path
) -> None:
    """fedlora's workflow asks ``screen_secagg`` before unmasking and leaves the liar out of
    the sum: the aggregate it hands over is the honest devices' mean, and it is applied."""
    strategy = make_strategy(tmp_path, secagg=True)
    before = [a.copy() for a in strategy.global_arrays]
    agg = [a.astype(np.float64) for a in update(5)]
    results = secagg_results(agg, {}, change, {})

    liars = strategy.screen_secagg(1, results, {})
    got, row = aggregate(strategy, results)

    assert liars == {2}
    assert got is not None and row["num_devices"] == 2 and "discarded" not in row
    assert row["rejected_by_reason"] == {reason: 1}
    assert strategy.budget.ledger.rounds_for("d1") == (1,)  # checked once: no replay refusal
    assert strategy.budget.ledger.rounds_for("d2") == ()
    for g, b, a in zip(parameters_to_ndarrays(got), before, agg, strict=True):
        np.testing.assert_array_equal(g, b + a.astype(np.float32))


def test_secagg_malformed_payload_is_rejected_after_its_event_is_recorded(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path, secagg=True)
    results = secagg_results([a.astype(np.float64) for a in update(5)], {}, {}, {})

    liars = strategy.screen_secagg(1, results, {3: "masked array 1 is 24 bytes, expected 12"})
    got, row = aggregate(strategy, results)

    assert liars == {3} and got is not None and row["num_devices"] == 2
    assert row["rejected_by_reason"] == {"masked_vector": 1}
    assert strategy.budget.ledger.rounds_for("d3") == (1,)  # it trained: its spend counts


@pytest.mark.parametrize(
    ("agg", "match"),
    [
        ([np.full(SHAPES[0], np.nan), np.zeros(3)], "NaN or Inf"),
        ([np.zeros(SHAPES[0]), np.array([0.0, 80.0, 0.0])], "clipping range"),
        ([np.full(SHAPES[0], 0.9), np.zeros(3)], "L2 norm"),  # √12·0.9 = 3.1 > 2
        ([np.zeros(SHAPES[0], np.float32), np.zeros(3, np.float32)], "dtype float32"),
        ([np.zeros((3, 4)), np.zeros(3)], "shape"),
    ],
)
def test_secagg_aggregate_that_clipped_updates_cannot_produce_is_discarded(
    agg: list[np.ndarray], match: str, tmp_path: Path
) -> None:
    strategy = make_strategy(tmp_path, secagg=True)
    before = [a.copy() for a in strategy.global_arrays]

    got, row = aggregate(strategy, secagg_results(agg, {}, {}, {}))

    assert got is None and row["num_devices"] == 0 and row["rejected"] == 0
    assert match in row["discarded"]
    for g, b in zip(strategy.global_arrays, before, strict=True):
        np.testing.assert_array_equal(g, b)


@pytest.mark.parametrize(("excess", "accepted"), [(1.0e-4, True), (3.0e-4, False)])
def test_secagg_norm_check_allows_for_quantization_error_and_no_more(
    excess: float, accepted: bool, tmp_path: Path
) -> None:
    """Weights 50, 80, 64 with max_weight 80 scale to round(w/80·2^22) = 2621440, 4194304,
    3355443 levels; three devices off by < 1 level of 2·64/2^22 each move a value of the mean
    by < 3·128/10171187 = 3.78e-5, and the norm of 15 values by < 1.46e-4."""
    strategy = make_strategy(tmp_path, secagg=True)
    norm = BOUND + excess
    agg = [np.full(SHAPES[0], norm / np.sqrt(12)), np.zeros(3)]

    got, row = aggregate(strategy, secagg_results(agg, {}, {}, {}))

    assert (got is not None) is accepted
    assert row["num_devices"] == (3 if accepted else 0)
