"""The coordinator's device-level DP plan (:mod:`fedlora.server.ddp`), the training
request's parameters (:mod:`fedlora.ddp.wire`) and the sampler's device-level budget."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlora.config import FedloraConfig
from fedlora.ddp.encoding import encode
from fedlora.ddp.wire import SEED_KEY, from_fit_config, to_fit_config
from fedlora.errors import ConfigError, UpdateError
from fedlora.privacy import epsilon_for_device
from fedlora.privacy.noise import SeededRandom
from fedlora.server.budget import FleetBudget
from fedlora.server.ddp import DeviceLevelDP, plan

D = 39_040  # the embedded default adapter's values (plain LoRA)


def _cfg(**device) -> FedloraConfig:
    return FedloraConfig.from_dict(
        {"privacy": {"unit": "device", "reproducible_noise": True, "device": device}, "seed": 7}
    )


def test_the_plan_spends_the_budget_in_the_configured_rounds_at_the_fewest_survivors():
    cfg = _cfg()
    got = plan(cfg, D)
    p = got.params
    assert (p.bits, p.clip, p.dimension) == (16, 1.0, D)
    assert (got.participations, got.min_survivors, got.max_summands) == (3, 9, 10)
    event = DeviceLevelDP(cfg, [(D,)]).event("d", 1, got.min_survivors, "r")
    eps = epsilon_for_device([event] * 1, 1e-5)
    spent = epsilon_for_device(
        [DeviceLevelDP(cfg, [(D,)]).event("d", r, 9, "r") for r in (1, 2, 3)], 1e-5
    )
    assert spent <= 8.0 and spent > 8.0 * 0.99  # σ is the smallest that fits, 4 digits
    assert eps < spent
    # 16 bits cost almost nothing against the ideal continuous noise z·C
    assert got.to_dict()["bytes_per_value"] == pytest.approx(2.0, abs=0.01)
    assert got.to_dict()["wrap_probability_bound"] <= 1e-9


def test_too_few_bits_for_the_noise_is_a_config_error_naming_bits():
    cfg = _cfg(bits=8, epsilon=0.5)
    with pytest.raises(ConfigError, match="bits 8"):
        plan(cfg, D)


def test_the_parameters_travel_and_come_back_exactly():
    ddp = DeviceLevelDP(_cfg(), [(D,)])
    config = ddp.fit_config(3)
    params, seed, survivors = from_fit_config(config)
    assert params == ddp.params and seed == ddp.rotation_seed(3) and survivors == 9
    assert from_fit_config({"round": 1}) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.pop("ddp-sigma"), "lacks"),
        (lambda c: c.__setitem__("ddp-bits", True), "not a number"),
        (lambda c: c.__setitem__("ddp-bits", 16.0), "not an integer"),
        (lambda c: c.__setitem__("ddp-scale", -1.0), "scale"),
        (lambda c: c.__setitem__("ddp-min-survivors", 1), "below 2"),
        (lambda c: c.__setitem__(SEED_KEY, "x"), "ddp-seed"),
    ],
)
def test_a_malformed_request_is_refused_with_a_reason(change, message):
    config = to_fit_config(DeviceLevelDP(_cfg(), [(D,)]).params, 5, 9)
    change(config)
    with pytest.raises(UpdateError, match=message):
        from_fit_config(config)


def test_rotation_seeds_are_fresh_per_round_and_seeded_only_when_asked():
    seeded = DeviceLevelDP(_cfg(), [(D,)])
    again = DeviceLevelDP(_cfg(), [(D,)])
    assert seeded.rotation_seed(1) == again.rotation_seed(1) != seeded.rotation_seed(2)
    secure = FedloraConfig.from_dict({"privacy": {"unit": "device"}})
    a, b = DeviceLevelDP(secure, [(D,)]), DeviceLevelDP(secure, [(D,)])
    assert a.rotation_seed(1) != b.rotation_seed(1)
    assert a.rotation_seed(1) == a.rotation_seed(1) < 2**63


def test_too_few_survivors_are_never_unmasked_and_a_wrong_count_is_refused():
    ddp = DeviceLevelDP(_cfg(), [(3, 4), (5,)])
    assert ddp.enough(9) is None and ddp.enough(10) is None
    assert "min_survivors=9" in ddp.enough(8)
    assert ddp.enough(11) is not None
    total = [np.array([3], dtype=np.uint64), np.zeros(ddp.params.padded_dimension, np.uint64)]
    with pytest.raises(UpdateError, match="counts 3"):
        ddp.decode(1, total, 9)


def test_decode_splits_the_mean_into_the_adapter_shapes():
    ddp = DeviceLevelDP(_cfg(), [(3, 4), (5,)])
    rng = np.random.default_rng(0)
    updates = [rng.normal(size=17) * 0.01 for _ in range(9)]
    mod = ddp.params.modulus
    total = np.zeros(ddp.params.padded_dimension, dtype=np.uint64)
    for i, u in enumerate(updates):
        total = (total + encode(u, ddp.params, ddp.rotation_seed(1), SeededRandom(i))) % mod
    mean = ddp.decode(1, [np.array([9], dtype=np.uint64), total], 9)
    assert [m.shape for m in mean] == [(3, 4), (5,)]
    flat = np.concatenate([m.reshape(-1) for m in mean])
    # σ·√9·C/s per coordinate of the sum, over 9: a few of those from the true mean
    std = ddp.params.noise_stddev * 3 * ddp.params.clip / ddp.params.scale / 9
    assert np.max(np.abs(flat - np.mean(updates, axis=0))) < 6 * std


def test_the_sampler_stops_a_device_whose_next_round_would_pass_its_device_budget():
    cfg = _cfg()
    ddp = DeviceLevelDP(cfg, [(D,)])
    budget = FleetBudget(cfg.privacy)
    budget.next_device_event = lambda device: ddp.event(device, 1, ddp.plan.min_survivors, "")
    budget.register(1, {"device": "a"})
    budget.register(2, {"device": "b"})
    for rnd in range(1, ddp.plan.participations + 1):
        assert budget.eligible([1, 2]) == [1, 2]
        budget.add_device_level(ddp.event("a", rnd, ddp.plan.min_survivors, "r"))
    assert budget.eligible([1, 2]) == [2]  # a has spent its participations' worth
    assert budget.worst_device_epsilon() == pytest.approx(budget.device_epsilon("a"))
    assert budget.device_epsilon("a") <= 8.0 and budget.epsilon("a") == 0.0  # no DP-SGD
    # More survivors than planned (more noise) leave room: b's rounds cost less.
    for rnd in range(1, ddp.plan.participations + 1):
        budget.add_device_level(ddp.event("b", rnd, 10, "r"))
    assert budget.device_epsilon("b") < budget.device_epsilon("a")
    assert math.isfinite(budget.device_epsilon("b"))
