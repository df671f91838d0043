"""FFA-LoRA's nested ranks: a device of tier r trains lora_B's first r columns and sends
zeros in the rest; the coordinator weighs column j by the devices that trained it, from
plaintext counts, exactly, with plain aggregation and with SecAgg+'s weighted mean."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy

from fedlora import fleetsim
from fedlora.config import FedloraConfig
from fedlora.server.aggregate import nested_column_scale, rescale_columns, weighted_mean
from fedlora.server.budget import FleetBudget
from fedlora.server.strategy import LoraFedAvg
from tests.server.fakes import task_identity

__all__ = ["task_identity"]

R = 4
SHAPES = [(5, R), (3, R)]  # lora_B tensors only: what FFA exchanges
PROFILES = [
    {"name": "full", "share": 0.34},
    {"name": "half", "share": 0.33, "lora_rank": 2},
    {"name": "quarter", "share": 0.33, "lora_rank": 1},
]
#: node → (device, records, tier): the devices' profiles are the seed's draws (checked below).
NODES = {1: ("d2", 50, 4), 2: ("d0", 80, 2), 3: ("d1", 64, 1)}


def _cfg(secagg: bool) -> FedloraConfig:
    return FedloraConfig().replace(
        lora={"variant": "ffa", "r": R},
        secagg={"enabled": secagg},
        privacy={"enabled": False},
        training={"local_steps": 10, "batch_size": 16, "rounds": 5},
        fleet={"num_devices": 4, "devices_per_round": 3, "min_devices": 3, "profiles": PROFILES},
    )


def _strategy(tmp_path: Path, secagg: bool, profiles: bool = True) -> LoraFedAvg:
    cfg = _cfg(secagg)
    budget = FleetBudget(cfg.privacy, steps_per_round=10, batch_size=16)
    for node, (device, records, _) in NODES.items():
        props: dict[str, Any] = {"device": device, "num_records": records}
        if profiles:
            props[fleetsim.PROFILE_PROPERTY] = fleetsim.profile_of(cfg.fleet, 0, device).name
        budget.register(node, props)
    return LoraFedAvg(
        cfg,
        initial_arrays=[np.full(s, 0.25, np.float32) for s in SHAPES],
        names=["b0", "b1"],
        evaluator=lambda arrays: 1.0,
        budget=budget,
        run_dir=tmp_path,
        run_id="7",
    )


def _update(node: int) -> list[np.ndarray]:
    """A device's update: values in its tier's columns, zeros in the rest."""
    rank = NODES[node][2]
    rng = np.random.default_rng(node)
    out = []
    for shape in SHAPES:
        u = rng.uniform(-1, 1, shape).astype(np.float32)
        u[:, rank:] = 0
        out.append(u)
    return out


def _result(node: int, arrays: list[np.ndarray] | None = None, **changes: Any):
    device, records, rank = NODES[node]
    metrics = {"device": device, "round": 1, "run": "7", "dp": False, "lora_rank": rank}
    metrics.update(changes)
    res = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(arrays if arrays is not None else _update(node)),
        num_examples=records,
        metrics=metrics,
    )
    return cast(ClientProxy, SimpleNamespace(node_id=node)), res


def _hand_mean() -> list[np.ndarray]:
    """Column 0: all three devices; column 1: the rank-4 and rank-2 ones; 2–3: rank 4 only."""
    u = {node: [a.astype(np.float64) for a in _update(node)] for node in NODES}
    n = {node: NODES[node][1] for node in NODES}
    out = []
    for k, shape in enumerate(SHAPES):
        m = np.zeros(shape)
        m[:, 0] = sum(n[i] * u[i][k][:, 0] for i in (1, 2, 3)) / (50 + 80 + 64)
        m[:, 1] = (n[1] * u[1][k][:, 1] + n[2] * u[2][k][:, 1]) / (50 + 80)
        m[:, 2:] = u[1][k][:, 2:]
        out.append(m)
    return out


def test_the_tiers_are_the_seeds_profile_draws() -> None:
    cfg = _cfg(False)
    for device, _, rank in NODES.values():
        assert fleetsim.tier_rank(fleetsim.profile_of(cfg.fleet, 0, device), R) == rank


def test_column_scale_is_all_over_those_that_trained_it() -> None:
    scale = nested_column_scale([(50, 4), (80, 2), (64, 1)], 4)

    np.testing.assert_allclose(scale, [1.0, 194 / 130, 194 / 50, 194 / 50], rtol=1e-15)
    assert nested_column_scale([(10, 1)], 3).tolist() == [1.0, 0.0, 0.0]


def test_plain_aggregation_weighs_each_column_by_the_devices_that_trained_it(
    tmp_path: Path,
) -> None:
    strategy = _strategy(tmp_path, secagg=False)

    params, _ = strategy.aggregate_fit(1, [_result(n) for n in NODES], [])

    assert params is not None
    for got, want in zip(parameters_to_ndarrays(params), _hand_mean(), strict=True):
        np.testing.assert_allclose(got, 0.25 + want, rtol=0, atol=1e-6)


def test_secagg_weighted_mean_rescaled_per_column_is_the_same_exact_mean(tmp_path: Path) -> None:
    """SecAgg+ hands every result Σ n_i u_i / Σ n_i over all devices (float64)."""
    strategy = _strategy(tmp_path, secagg=True)
    masked_sum = weighted_mean([(_update(n), NODES[n][1]) for n in NODES])
    shared = ndarrays_to_parameters([a.astype(np.float64) for a in masked_sum])
    results = []
    for node in NODES:
        proxy, res = _result(node)
        res.parameters = shared
        results.append((proxy, res))

    params, _ = strategy.aggregate_fit(1, results, [])

    assert params is not None
    for got, want in zip(parameters_to_ndarrays(params), _hand_mean(), strict=True):
        np.testing.assert_allclose(got, 0.25 + want, rtol=0, atol=1e-6)


def test_rescaling_undoes_the_zero_padding_in_the_mean() -> None:
    mean = weighted_mean([(_update(n), NODES[n][1]) for n in NODES])

    got = rescale_columns(mean, nested_column_scale([(50, 4), (80, 2), (64, 1)], R))

    for g, want in zip(got, _hand_mean(), strict=True):
        np.testing.assert_allclose(g, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("secagg", [False, True])
def test_a_rank_claim_other_than_the_tier_is_rejected(tmp_path: Path, secagg: bool) -> None:
    strategy = _strategy(tmp_path, secagg=secagg)
    results = [_result(1), _result(2, lora_rank=4), _result(3)]

    strategy.aggregate_fit(1, results, [])

    assert strategy._round.rejected_by_reason == {"lora_rank": 1}


def test_values_outside_a_tiers_columns_are_rejected_in_plain_aggregation(
    tmp_path: Path,
) -> None:
    strategy = _strategy(tmp_path, secagg=False)
    bad = _update(3)
    bad[1][0, 3] = 0.5

    params, _ = strategy.aggregate_fit(1, [_result(1), _result(2), _result(3, bad)], [])

    assert strategy._round.rejected_by_reason == {"lora_rank": 1}
    assert params is not None  # the other two are averaged, by their own tiers
    want = weighted_mean([(_update(1), 50), (_update(2), 80)])
    want = rescale_columns(want, nested_column_scale([(50, 4), (80, 2)], R))
    for got, w in zip(parameters_to_ndarrays(params), want, strict=True):
        np.testing.assert_allclose(got, 0.25 + w, rtol=0, atol=1e-6)


def test_a_device_without_a_profile_trains_every_column(tmp_path: Path) -> None:
    """A deployed device reports no profile: the coordinator expects rank lora.r."""
    strategy = _strategy(tmp_path, secagg=False, profiles=False)

    strategy.aggregate_fit(1, [_result(n) for n in NODES], [])

    assert strategy._round.rejected_by_reason == {"lora_rank": 2}


@pytest.mark.usefixtures("task_identity")
def test_nested_ranks_through_real_secagg_masking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Six devices run Flower's own secaggplus_mod (key agreement, shares, masking); each
    sends zeros beyond its tier. The unmasked weighted mean, rescaled per column, is
    the per-column mean of the devices that trained each column, to SecAgg+'s
    quantization error times that column's factor."""
    from tests.server import test_secagg_dropouts as real

    ranks = dict(zip(real.NODES, (2, 2, 1, 2, 1, 1), strict=True))

    def zero_padded(node: int) -> list[np.ndarray]:
        rng = np.random.default_rng(node)
        b = rng.uniform(-1, 1, (2, 2)).astype(np.float32)
        b[:, ranks[node] :] = 0
        return [np.zeros(3, np.float32), b]

    monkeypatch.setattr(real, "_update", zero_padded)
    strategy, halts, _ = real.run_round({})

    assert not halts
    ((results, _),) = strategy.aggregated
    masked_mean = parameters_to_ndarrays(results[0][1].parameters)[1]
    tiers = [(real._weight(n), ranks[n]) for n in real.NODES]
    scale = nested_column_scale(tiers, 2)
    (got,) = rescale_columns([masked_mean], scale)
    want = np.zeros((2, 2))
    for j in range(2):
        trained = [n for n in real.NODES if ranks[n] > j]
        total = sum(real._weight(n) for n in trained)
        want[:, j] = sum(real._weight(n) * zero_padded(n)[1][:, j] for n in trained) / total
    tolerance = real._tolerance(list(real.NODES)) * float(scale.max())
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)
    assert scale.tolist() == [1.0, 210 / 70]  # nodes 11, 12, 14 (10 + 20 + 40) train column 1


def test_under_secagg_a_false_rank_claim_is_screened_out_before_unmasking(
    tmp_path: Path,
) -> None:
    """The tier claim sets how much a device's columns weigh, so SecAgg+'s check before
    the unmask stage refuses a false one: the liar is left out of the sum, and the round
    is aggregated without it instead of being discarded after unmasking."""
    strategy = _strategy(tmp_path, secagg=True)
    # What SecAgg+ unmasks without the liar: the honest devices' weighted mean (float64).
    honest = [a.astype(np.float64) for a in weighted_mean([(_update(1), 50), (_update(3), 64)])]
    results = [_result(1, honest), _result(2, honest, lora_rank=4), _result(3, honest)]

    liars = strategy.screen_secagg(1, results, {})
    params, _ = strategy.aggregate_fit(1, results, [])

    assert liars == {2}
    assert strategy._round.rejected_by_reason == {"lora_rank": 1}
    assert strategy._round.rejected_in_sum == 0 and strategy._round.discarded_reason is None
    assert params is not None
    want = rescale_columns(honest, nested_column_scale([(50, 4), (64, 1)], R))
    for got, w in zip(parameters_to_ndarrays(params), want, strict=True):
        np.testing.assert_allclose(got, 0.25 + w, rtol=0, atol=1e-6)
