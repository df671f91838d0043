"""One contract, run against every accountant (after dp_accounting's privacy_accountant_test)."""

import json
import math

import pytest
from scipy import optimize, special

from fedlora.errors import ConfigError, PrivacyError
from fedlora.privacy.accountants import (
    ACCOUNTANTS,
    Accountant,
    PRVAccountant,
    RDPAccountant,
    epsilon_for,
    get_accountant,
)
from fedlora.privacy.accountants.rdp import DEFAULT_ORDERS
from tests.privacy._helpers import event, schedule


def gaussian_epsilon(steps: int, sigma: float, delta: float) -> float:
    """Exact ε of ``steps`` full-batch Gaussian steps (q = 1): a Gaussian with μ = √steps / σ.

    δ(ε) = Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2) (Balle & Wang 2018), solved for ε.
    """
    mu = math.sqrt(steps) / sigma

    def excess(eps: float) -> float:
        return (
            special.ndtr(-eps / mu + mu / 2)
            - math.exp(eps + special.log_ndtr(-eps / mu - mu / 2))
            - delta
        )

    return optimize.brentq(excess, 0.0, 1e4, xtol=1e-12)


def gaussian_rdp_epsilon(steps: int, sigma: float, delta: float) -> float:
    """RDP ε for q = 1, where RDP is exactly α·steps/(2σ²), via the improved conversion."""
    return min(
        a * steps / (2 * sigma**2) + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        for a in DEFAULT_ORDERS
    )


class AccountantContract:
    """Behaviour every accountant must have. Subclasses set ``name`` and the expectations."""

    name: str
    # (groups ((σ, q, steps), ...), δ, expected ε, relative tolerance)
    expected: tuple[tuple[tuple[tuple[float, float, int], ...], float, float, float], ...]

    def make(self) -> Accountant:
        return get_accountant(self.name)

    def epsilon(self, groups, delta=1e-5) -> float:
        acc = self.make()
        acc.compose_many(schedule(groups, delta))
        return acc.get_epsilon(delta)

    def gaussian_bounds(self, steps: int, sigma: float, delta: float) -> tuple[float, float]:
        """(lowest, highest) acceptable ε for q = 1; the exact value is ``gaussian_epsilon``."""
        raise NotImplementedError

    # ------------------------------------------------------------ basics
    def test_registry_gives_this_accountant(self):
        acc = self.make()

        assert acc.name == self.name
        assert self.name in ACCOUNTANTS

    def test_fresh_accountant_has_zero_epsilon(self):
        assert self.make().get_epsilon(1e-5) == 0.0

    def test_zero_steps_spend_nothing(self):
        acc = self.make()
        acc.compose(event(steps=0))

        assert acc.get_epsilon(1e-5) == 0.0
        assert acc.history == ()

    @pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, float("nan"), True, "1e-5"])
    def test_invalid_delta_is_refused(self, delta):
        with pytest.raises(PrivacyError, match="delta"):
            self.make().get_epsilon(delta)

    # ------------------------------------------------------------ refusals
    def test_unknown_mechanism_is_refused(self):
        acc = self.make()
        foreign = event()
        object.__setattr__(foreign, "mechanism", "laplace")  # e.g. from a newer fedlora

        with pytest.raises(PrivacyError, match="does not support mechanism 'laplace'"):
            acc.compose(foreign)
        assert acc.get_epsilon(1e-5) == 0.0

    def test_non_event_is_refused(self):
        with pytest.raises(PrivacyError, match="does not understand dict"):
            self.make().compose({"noise_multiplier": 1.0})  # type: ignore[arg-type]

    def test_compose_many_is_all_or_nothing(self):
        acc = self.make()
        bad = event(round=2)
        object.__setattr__(bad, "mechanism", "laplace")

        with pytest.raises(PrivacyError):
            acc.compose_many([event(round=1), bad])
        assert acc.history == ()

    # ------------------------------------------------------------ state
    def test_state_round_trips_through_json(self):
        acc = self.make()
        acc.compose_many(schedule(((1.0, 0.1, 30), (1.5, 0.05, 20), (1.0, 0.1, 10))))

        restored = self.make()
        restored.load_state_dict(json.loads(json.dumps(acc.state_dict())))

        assert restored.history == acc.history == ((1.0, 0.1, 40), (1.5, 0.05, 20))
        assert restored.get_epsilon(1e-5) == acc.get_epsilon(1e-5)

    def test_state_of_another_accountant_is_refused(self):
        other = next(n for n in ACCOUNTANTS if n != self.name)
        state = get_accountant(other).state_dict()

        with pytest.raises(PrivacyError, match=f"from the '{other}' accountant"):
            self.make().load_state_dict(state)

    def test_state_of_another_mechanism_is_refused(self):
        state = self.make().state_dict() | {"mechanism": "laplace"}

        with pytest.raises(PrivacyError, match="mechanism 'laplace'"):
            self.make().load_state_dict(state)

    @pytest.mark.parametrize(
        "entry",
        [
            {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": True},
            {"noise_multiplier": 1, "sample_rate": 0.1, "steps": 5},
            {"noise_multiplier": 1.0, "sample_rate": 0.1},
            {"noise_multiplier": 1.0, "sample_rate": 2.0, "steps": 5},
        ],
    )
    def test_malformed_state_is_refused_and_leaves_state_alone(self, entry):
        acc = self.make()
        acc.compose(event())
        state = acc.state_dict() | {"history": [entry]}

        with pytest.raises(PrivacyError):
            acc.load_state_dict(state)
        assert acc.history == ((1.0, 0.1, 10),)

    # ------------------------------------------------------------ values
    def test_expected_values(self):
        for groups, delta, expected, rel in self.expected:
            assert self.epsilon(groups, delta) == pytest.approx(expected, rel=rel), groups

    @pytest.mark.parametrize(("steps", "sigma"), [(10, 1.0), (1, 50.0), (200, 3.0)])
    def test_full_batch_against_the_exact_gaussian_epsilon(self, steps, sigma):
        low, high = self.gaussian_bounds(steps, sigma, 1e-5)

        eps = self.epsilon(((sigma, 1.0, steps),))

        assert low <= eps <= high

    def test_monotone_in_steps(self):
        eps = [self.epsilon(((1.0, 0.05, n),)) for n in (10, 50, 250)]

        assert 0.0 < eps[0] < eps[1] < eps[2]

    def test_decreasing_in_noise(self):
        eps = [self.epsilon(((s, 0.05, 100),)) for s in (0.7, 1.0, 2.0, 4.0)]

        assert eps == sorted(eps, reverse=True)
        assert len(set(eps)) == 4

    def test_decreasing_in_delta(self):
        acc = self.make()
        acc.compose(event(steps=100))

        assert acc.get_epsilon(1e-7) > acc.get_epsilon(1e-5) > acc.get_epsilon(1e-3)

    def test_only_the_multiset_of_steps_matters(self):
        a = self.make()
        a.compose_many(schedule(((1.0, 0.1, 10), (2.0, 0.2, 5), (1.0, 0.1, 30))))
        b = self.make()
        b.compose_many(schedule(((2.0, 0.2, 5), (1.0, 0.1, 40))))

        assert a.get_epsilon(1e-5) == b.get_epsilon(1e-5)


class TestPRVAccountant(AccountantContract):
    name = "prv"
    expected = (
        # Opacus 1.6 PRVAccountant (eps_error=0.01, delta_error=δ/1000), its upper bound
        (((1.0, 0.1, 500),), 1e-5, 16.572575, 1e-6),
        (((1.0, 0.1, 200), (1.5, 0.1, 100), (0.9, 0.2, 50)), 1e-5, 16.777691, 1e-6),
        (((0.7, 0.2, 300),), 1e-5, 55.156127, 1e-6),  # prv_accountant 0.2.0 itself fails here
    )

    def gaussian_bounds(self, steps, sigma, delta):
        # Upper bound: never below the exact ε, at most ~2·eps_error above it.
        exact = gaussian_epsilon(steps, sigma, delta)
        return exact, exact + 0.021

    def test_bounds_bracket_the_estimate(self):
        acc = PRVAccountant()
        acc.compose(event(steps=100))

        lower, estimate, upper = acc.get_epsilon_bounds(1e-5)

        assert lower < estimate < upper == acc.get_epsilon(1e-5)
        assert upper - lower == pytest.approx(0.02, abs=1e-3)

    def test_tiny_epsilon_falls_back_to_the_tighter_rdp_bound(self):
        groups = ((1000.0, 0.1, 500),)
        acc = PRVAccountant()
        acc.compose_many(schedule(groups))

        upper = acc.get_epsilon_bounds(1e-5)[2]

        assert acc.get_epsilon(1e-5) == epsilon_for(schedule(groups), 1e-5, "rdp")
        assert acc.get_epsilon(1e-5) < upper

    def test_invalid_settings_are_refused(self):
        with pytest.raises(PrivacyError, match="eps_error"):
            PRVAccountant(eps_error=0.0)


class TestRDPAccountant(AccountantContract):
    name = "rdp"
    expected = (
        # dp_accounting 0.6.0 RdpAccountant, same default orders
        (((1.0, 0.1, 100),), 1e-5, 7.9038502, 1e-6),
        (((0.8, 0.01, 1000),), 1e-6, 4.2934567, 1e-6),
    )

    def gaussian_bounds(self, steps, sigma, delta):
        # RDP is exact for q = 1, so the derived value must come out; it is looser than exact.
        derived = gaussian_rdp_epsilon(steps, sigma, delta)
        assert derived >= gaussian_epsilon(steps, sigma, delta)
        return derived * (1 - 1e-9), derived * (1 + 1e-9)

    def test_custom_orders(self):
        acc = RDPAccountant(orders=(2.0, 4.0, 8.0))
        acc.compose(event(sample_rate=1.0, steps=10))

        assert acc.get_epsilon(1e-5) == pytest.approx(
            min(a * 10 / 2 + math.log1p(-1 / a) - math.log(1e-5 * a) / (a - 1) for a in (2, 4, 8))
        )


# ---------------------------------------------------------------- registry
def test_unknown_accountant_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown privacy accountant 'gdp'.*prv, rdp"):
        get_accountant("gdp")


def test_epsilon_for_defaults_to_prv():
    events = schedule(((1.0, 0.1, 50),))

    assert epsilon_for(events, 1e-5) == epsilon_for(events, 1e-5, "prv")
    assert epsilon_for(events, 1e-5, "prv") < epsilon_for(events, 1e-5, "rdp")
    assert epsilon_for([], 1e-5) == 0.0


def test_registry_returns_fresh_accountants():
    a = get_accountant("prv")
    a.compose(event())

    assert get_accountant("prv").get_epsilon(1e-5) == 0.0


def test_rdp_binomial_table_is_the_direct_computation():
    import numpy as np

    from fedlora.privacy.accountants.rdp import _log_comb, _log_comb_table

    orders = (1.5, 2.25, 11.0, 63.0)
    with np.errstate(invalid="ignore"):
        direct = _log_comb(np.asarray(orders)[:, None], np.arange(70.0)[None, :])

    np.testing.assert_array_equal(_log_comb_table(orders, 70), direct)
    assert not _log_comb_table(orders, 70).flags.writeable
