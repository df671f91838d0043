"""Server optimizers: each one's math against a hand computation, FedAvg unchanged bit for
bit, the state saved beside the checkpoint and refused when it is not this run's, and a
strategy cut after a round and restored that ends where an uninterrupted one does."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.client_proxy import ClientProxy

from fedlora.config import FedloraConfig, TrainingSection
from fedlora.errors import ConfigError
from fedlora.server.aggregate import apply_update
from fedlora.server.budget import FleetBudget
from fedlora.server.checkpoint import save_checkpoint
from fedlora.server.optimizers import ServerOptimizer, state_path
from fedlora.server.strategy import LoraFedAvg

NAMES = ["a", "b"]
SHAPES = [(2,), (1, 1)]


def opt(name: str, **training: Any) -> ServerOptimizer:
    return ServerOptimizer(TrainingSection(server_optimizer=name, **training), NAMES)


def arrays(x: float, y: float, z: float) -> list[np.ndarray]:
    return [np.array([x, y], np.float32), np.array([[z]], np.float32)]


def close(got: list[np.ndarray], want: list[list[float]]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g.ravel(), w, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ math


def test_fedavg_is_global_plus_mean_bit_for_bit():
    rng = np.random.default_rng(0)
    g = [rng.standard_normal(s).astype(np.float32) for s in [(5, 3), (7,)]]
    u = [rng.standard_normal(s).astype(np.float32) for s in [(5, 3), (7,)]]
    got = ServerOptimizer(TrainingSection(), ["x", "y"]).step(g, u)
    want = apply_update(g, u)
    assert all(
        a.tobytes() == b.tobytes() and a.dtype == b.dtype for a, b in zip(got, want, strict=True)
    )


def test_fedavgm_accumulates_momentum():
    o = opt("fedavgm", server_learning_rate=0.5)  # β = 0.9
    g1 = o.step(arrays(0, 0, 1), arrays(1, 2, -2))
    # v1 = Δ1 = (1, 2, -2); g1 = g0 + 0.5·v1
    close(g1, [[0.5, 1.0], [0.0]])
    g2 = o.step(g1, arrays(3, -1, 0))
    # v2 = 0.9·(1, 2, -2) + (3, -1, 0) = (3.9, 0.8, -1.8); g2 = g1 + 0.5·v2
    close(g2, [[0.5 + 1.95, 1.0 + 0.4], [-0.9]])
    assert o.steps == 2
    np.testing.assert_allclose(o.slots["momentum"][0], [3.9, 0.8])


def test_fedavgm_with_no_momentum_and_unit_rate_is_fedavg():
    o = opt("fedavgm", server_momentum=0.0)
    g = arrays(0.25, -1, 2)
    for d in (arrays(1, 2, 3), arrays(-0.5, 0.125, 1)):
        want = apply_update(g, d)
        g = o.step(g, d)
        close(g, [w.ravel().tolist() for w in want])


def test_fedadam_follows_reddi_et_al_algorithm_2():
    o = opt("fedadam")  # η = 0.01, β1 = 0.9, β2 = 0.99, τ = 1e-3; v starts at τ²
    assert o.lr == 0.01
    tau = 1e-3
    d1 = (0.5, -0.02, 0.0)
    g1 = o.step(arrays(0, 1, 0), arrays(*d1))
    m1 = [0.1 * d for d in d1]
    v1 = [0.99 * tau**2 + 0.01 * d * d for d in d1]
    x1 = [0.01 * m / (math.sqrt(v) + tau) for m, v in zip(m1, v1, strict=True)]
    close(g1, [[x1[0], 1 + x1[1]], [x1[2]]])
    d2 = (-0.5, 0.04, 1.0)
    g2 = o.step(g1, arrays(*d2))
    m2 = [0.9 * m + 0.1 * d for m, d in zip(m1, d2, strict=True)]
    v2 = [0.99 * v + 0.01 * d * d for v, d in zip(v1, d2, strict=True)]
    x2 = [0.01 * m / (math.sqrt(v) + tau) for m, v in zip(m2, v2, strict=True)]
    close(g2, [[x1[0] + x2[0], 1 + x1[1] + x2[1]], [x1[2] + x2[2]]])
    assert o.steps == 2


def test_a_step_that_is_not_finite_leaves_the_state_as_it_was():
    o = opt("fedavgm")
    o.step(arrays(0, 0, 0), arrays(1, 1, 1))
    before = [a.copy() for a in o.slots["momentum"]]
    out = o.step(arrays(np.inf, 0, 0), arrays(1, 1, 1))
    assert not np.isfinite(out[0]).all()  # the strategy discards the round
    assert o.steps == 1
    assert all(np.array_equal(a, b) for a, b in zip(o.slots["momentum"], before, strict=True))


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"server_optimizer": "adam"}, "must be one of fedavg, fedavgm, fedadam"),
        ({"server_optimizer": "fedadam", "server_learning_rate": 0.0}, "positive number"),
        ({"server_optimizer": "fedavgm", "server_learning_rate": math.inf}, "positive number"),
        ({"server_learning_rate": 0.5}, "fedavg adds the mean update as it is"),
        ({"server_optimizer": "fedavgm", "server_momentum": 1.0}, r"in \[0, 1\)"),
        ({"server_momentum": -0.1}, r"in \[0, 1\)"),
    ],
)
def test_bad_server_optimizer_settings_are_refused_in_one_line(training, message):
    with pytest.raises(ConfigError, match=message):
        FedloraConfig.from_dict({"training": training})


def test_a_config_without_the_keys_is_fedavg():
    t = FedloraConfig.from_dict({"version": 5, "training": {"rounds": 2}}).training
    assert (t.server_optimizer, t.server_learning_rate, t.server_momentum) == ("fedavg", None, 0.9)
    saved = FedloraConfig().replace(training={"server_optimizer": "fedadam"}).to_dict()
    assert FedloraConfig.from_dict(saved).training.server_optimizer == "fedadam"


# ------------------------------------------------------------------ state on disk


def _ckpt(tmp_path: Path, rnd: int) -> Path:
    return save_checkpoint(tmp_path / "checkpoints", rnd, NAMES, arrays(0, 0, 0))


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_state_round_trips_beside_the_checkpoint(tmp_path, name):
    o = opt(name)
    o.step(arrays(0, 0, 0), arrays(0.1, -0.2, 0.3))
    o.step(arrays(0, 0, 0), arrays(0.3, 0.1, -0.1))
    ckpt = _ckpt(tmp_path, 2)
    path = o.save(ckpt)
    assert path == tmp_path / "checkpoints" / "server-optimizer-0002.safetensors"
    assert path == state_path(ckpt)
    again = opt(name)
    again.load(ckpt, SHAPES)
    assert again.steps == 2 and again.slots.keys() == o.slots.keys()
    for slot, values in o.slots.items():
        assert all(np.array_equal(a, b) for a, b in zip(again.slots[slot], values, strict=True))
    g = arrays(1, 2, 3)
    d = arrays(0.5, 0.5, -0.5)
    assert all(np.array_equal(a, b) for a, b in zip(again.step(g, d), o.step(g, d), strict=True))


def test_fedavg_writes_no_state_and_round_0_needs_none(tmp_path):
    assert opt("fedavg").save(_ckpt(tmp_path, 1)) is None
    fresh = opt("fedadam")
    fresh.load(_ckpt(tmp_path, 0), SHAPES)  # the initial adapter: no step taken yet
    assert fresh.steps == 0 and fresh.slots == {}


def test_a_missing_state_after_round_0_is_refused(tmp_path):
    with pytest.raises(
        ConfigError, match=r"missing: the fedavgm server optimizer.s state after round-0003"
    ):
        opt("fedavgm").load(_ckpt(tmp_path, 3), SHAPES)


@pytest.mark.parametrize(
    ("other", "training"),
    [
        ("fedadam", {}),
        ("fedavgm", {"server_momentum": 0.5}),
        ("fedavgm", {"server_learning_rate": 2.0}),
    ],
)
def test_a_state_of_another_optimizer_or_setting_is_refused(tmp_path, other, training):
    o = opt("fedavgm")
    o.step(arrays(0, 0, 0), arrays(1, 1, 1))
    ckpt = _ckpt(tmp_path, 1)
    o.save(ckpt)
    with pytest.raises(ConfigError, match="holds the state of server optimizer"):
        opt(other, **training).load(ckpt, SHAPES)


def test_a_state_of_another_round_is_refused(tmp_path):
    o = opt("fedavgm")
    o.step(arrays(0, 0, 0), arrays(1, 1, 1))
    o.save(_ckpt(tmp_path, 1))
    ckpt = _ckpt(tmp_path, 2)
    state_path(ckpt).write_bytes(
        state_path(tmp_path / "checkpoints" / "round-0001.safetensors").read_bytes()
    )
    with pytest.raises(ConfigError, match="another round's state"):
        opt("fedavgm").load(ckpt, SHAPES)


def test_a_state_that_would_not_be_finite_is_not_taken(tmp_path):
    o = opt("fedadam")
    out = o.step(arrays(0, 0, 0), arrays(np.inf, 0, 0))  # m and v would not be finite
    assert not np.isfinite(out[0]).all() and o.steps == 0 and o.slots == {}


def test_a_state_of_other_shapes_is_refused(tmp_path):
    o = opt("fedadam")
    o.step(arrays(0, 0, 0), arrays(1, 1, 1))
    ckpt = _ckpt(tmp_path, 1)
    o.save(ckpt)
    with pytest.raises(ConfigError, match="m has shapes"):
        opt("fedadam").load(ckpt, [(3,), (1, 1)])


def test_a_torn_state_file_is_refused(tmp_path):
    ckpt = _ckpt(tmp_path, 1)
    state_path(ckpt).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ConfigError, match="cannot be read"):
        opt("fedavgm").load(ckpt, SHAPES)


# ------------------------------------------------------------------ resume at the strategy


def _strategy(run_dir: Path, cfg: FedloraConfig) -> LoraFedAvg:
    budget = FleetBudget(cfg.privacy, steps_per_round=2, batch_size=4)
    for node in (1, 2, 3):
        budget.register(node, {"device": f"d{node}", "num_records": 40 + node})
    initial = [np.zeros((3, 2), np.float32), np.full((4,), 0.5, np.float32)]
    return LoraFedAvg(cfg, initial, ["x", "y"], lambda a: 1.0, budget, run_dir, run_id="7")


def _round(strategy: LoraFedAvg, rnd: int) -> None:
    results = []
    for node in (1, 2, 3):
        rng = np.random.default_rng(100 * rnd + node)
        update = [(rng.standard_normal(s) * 0.1).astype(np.float32) for s in [(3, 2), (4,)]]
        metrics = {"device": f"d{node}", "round": rnd, "run": "7", "dp": False}
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), 40 + node, metrics)
        results.append((cast(ClientProxy, SimpleNamespace(node_id=node)), res))
    params, _ = strategy.aggregate_fit(rnd, results, [])
    assert params is not None


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_a_strategy_restored_after_round_2_ends_where_an_uninterrupted_one_does(tmp_path, name):
    cfg = FedloraConfig().replace(
        privacy={"enabled": False},
        secagg={"enabled": False},
        fleet={"num_devices": 3, "devices_per_round": 3, "min_devices": 3},
        training={"rounds": 4, "server_optimizer": name},
    )
    whole = _strategy(tmp_path / "whole", cfg)
    for rnd in range(1, 5):
        _round(whole, rnd)
    cut = _strategy(tmp_path / "cut", cfg)
    for rnd in (1, 2):
        _round(cut, rnd)
    committed = cut.checkpoint
    assert committed is not None and state_path(committed).is_file()
    resumed = _strategy(tmp_path / "cut", cfg)
    resumed.restore(
        [a.copy() for a in cut.global_arrays],
        checkpoint=committed,
        sampler_state=cut.sampler_state,
        rows=[],
        wall_s=0.0,
    )
    for rnd in (3, 4):
        _round(resumed, rnd)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(resumed.global_arrays, whole.global_arrays, strict=True)
    )
    # Without its state the resumed run would have restarted the momentum: it differs.
    fresh = _strategy(tmp_path / "fresh", cfg)
    fresh.global_arrays = [a.copy() for a in cut.global_arrays]
    for rnd in (3, 4):
        _round(fresh, rnd)
    assert not all(
        np.array_equal(a, b) for a, b in zip(fresh.global_arrays, whole.global_arrays, strict=True)
    )
