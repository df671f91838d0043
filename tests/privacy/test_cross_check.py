"""Our accountants against independent implementations: dp_accounting and Opacus.

Agreement must be within 1 % for ε ≳ 1; the PRV accountant adds an absolute
eps_error slack (0.01) to report an upper bound, which is more than 1 % of a
tiny ε, so that regime is checked with an absolute tolerance instead.
"""

import logging
import warnings

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp import rdp_privacy_accountant as dp_rdp

from fedlora.privacy.accountants import epsilon_for
from fedlora.privacy.accountants.rdp import (
    DEFAULT_ORDERS,
    RDPAccountant,
    rdp_poisson_subsampled_gaussian,
)
from tests.privacy._helpers import schedule

opacus_accountants = pytest.importorskip("opacus.accountants")

CASES = [
    pytest.param(((1.0, 0.1, 100),), 1e-5, id="q.1-s1-100"),
    pytest.param(((0.8, 0.01, 1000),), 1e-6, id="q.01-s.8-1000"),
    pytest.param(((2.0, 0.5, 30),), 1e-5, id="q.5-s2-30"),
    pytest.param(((1.1, 0.05, 500),), 1e-5, id="q.05-s1.1-500"),
    pytest.param(((1.0, 1.0, 10),), 1e-5, id="full-batch"),
    pytest.param(((1.0, 0.1, 200), (1.5, 0.1, 100), (0.9, 0.2, 50)), 1e-5, id="hetero-3"),
    pytest.param(((0.6, 0.02, 300), (2.0, 0.3, 20)), 1e-4, id="hetero-2"),
]

OPACUS_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)])


@pytest.fixture(autouse=True)
def _quiet():
    # dp_accounting logs every RDP order it drops; Opacus warns when the best order is the last.
    logging.getLogger("absl").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def dp_accounting_epsilon(accountant, groups, delta):
    for sigma, q, steps in groups:
        accountant.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
            )
        )
    return float(accountant.get_epsilon(delta))


def opacus_epsilon(accountant, groups, delta):
    for sigma, q, steps in groups:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return float(accountant.get_epsilon(delta))


# ---------------------------------------------------------------- PRV
@pytest.mark.parametrize(("groups", "delta"), CASES)
def test_prv_matches_dp_accounting_pld(groups, delta):
    # PLD's default interval 1e-4 gives the same ε to 1e-5 here, 10x slower.
    pld = dp_accounting_epsilon(PLDAccountant(value_discretization_interval=1e-3), groups, delta)

    ours = epsilon_for(schedule(groups, delta), delta, "prv")

    assert ours == pytest.approx(pld, rel=0.01)
    assert ours >= pld * (1 - 1e-4)  # ours is an upper bound


@pytest.mark.parametrize(("groups", "delta"), CASES)
def test_prv_matches_opacus_prv(groups, delta):
    theirs = opacus_epsilon(opacus_accountants.PRVAccountant(), groups, delta)

    ours = epsilon_for(schedule(groups, delta), delta, "prv")

    assert ours == pytest.approx(theirs, rel=0.001)


def test_prv_tiny_epsilon_within_the_eps_error_slack():
    groups, delta = ((5.0, 0.01, 100),), 1e-5
    pld = dp_accounting_epsilon(PLDAccountant(value_discretization_interval=1e-4), groups, delta)

    ours = epsilon_for(schedule(groups, delta), delta, "prv")

    assert pld <= ours <= pld + 0.02


# ---------------------------------------------------------------- RDP
@pytest.mark.parametrize(("groups", "delta"), CASES)
def test_rdp_matches_dp_accounting_rdp(groups, delta):
    theirs = dp_accounting_epsilon(RdpAccountant(), groups, delta)

    ours = epsilon_for(schedule(groups, delta), delta, "rdp")

    assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize(("groups", "delta"), CASES)
def test_rdp_matches_opacus_rdp(groups, delta):
    theirs = opacus_epsilon(opacus_accountants.RDPAccountant(), groups, delta)
    acc = RDPAccountant(orders=OPACUS_ORDERS)
    acc.compose_many(schedule(groups, delta))

    same_orders = acc.get_epsilon(delta)
    default_orders = epsilon_for(schedule(groups, delta), delta, "rdp")

    # Opacus sums the fractional-order series with signs; we (like dp_accounting) add
    # absolute values, an upper bound up to ~0.5 % looser, so never below theirs.
    assert same_orders == pytest.approx(theirs, rel=0.01)
    assert same_orders >= theirs * (1 - 1e-9)
    assert default_orders == pytest.approx(theirs, rel=0.01)


@pytest.mark.parametrize(
    ("q", "sigma"),
    [(0.1, 1.0), (0.01, 0.7), (0.5, 3.0), (1e-4, 0.5), (0.9, 1.5), (0.1, 20.0), (1.0, 1.0)],
)
def test_rdp_curve_matches_dp_accounting(q, sigma):
    theirs = dp_rdp._compute_rdp_poisson_subsampled_gaussian(q, sigma, DEFAULT_ORDERS)

    ours = rdp_poisson_subsampled_gaussian(q, sigma)

    finite = np.isfinite(theirs)
    assert np.array_equal(finite, np.isfinite(ours))  # same orders left out
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-4)
