import pytest

from fedlora.errors import BudgetExhaustedError, ConfigError, PrivacyError
from fedlora.privacy.accountants import epsilon_for
from fedlora.privacy.calibrate import calibrate_noise_multiplier, epsilon_after
from fedlora.privacy.events import DPSGDEvent
from tests.privacy._helpers import event, schedule

DELTA = 1e-5


def planned_epsilon(sigma, q, steps, rounds, history=(), accountant="prv"):
    planned = event(
        device="x", round=999, noise_multiplier=sigma, sample_rate=q, steps=steps * rounds
    )
    return epsilon_after(history, planned, DELTA, accountant)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize(
    ("target", "q", "steps", "rounds"), [(3.0, 0.1, 10, 20), (1.0, 0.02, 25, 8)]
)
def test_calibrated_sigma_meets_the_target_tightly(accountant, target, q, steps, rounds):
    sigma = calibrate_noise_multiplier(target, DELTA, q, steps, rounds, accountant=accountant)

    assert planned_epsilon(sigma, q, steps, rounds, accountant=accountant) <= target
    assert planned_epsilon(sigma * 0.99, q, steps, rounds, accountant=accountant) > target
    assert sigma == float(f"{sigma:.4g}")  # rounded (up) to 4 significant digits


def test_prv_needs_less_noise_than_rdp():
    kwargs = {"target_epsilon": 3.0, "delta": DELTA, "sample_rate": 0.1, "steps_per_round": 10}

    prv = calibrate_noise_multiplier(**kwargs, rounds=20)
    rdp = calibrate_noise_multiplier(**kwargs, rounds=20, accountant="rdp")

    assert prv < rdp


def test_history_takes_part_of_the_budget_so_more_noise_is_needed():
    history = schedule(((2.0, 0.1, 100),))
    spent = epsilon_for(history, DELTA)
    assert 1.0 < spent < 3.0

    fresh = calibrate_noise_multiplier(3.0, DELTA, 0.1, 10, 10)
    after = calibrate_noise_multiplier(3.0, DELTA, 0.1, 10, 10, history=history)

    assert after > fresh
    assert planned_epsilon(after, 0.1, 10, 10, history) <= 3.0
    assert planned_epsilon(after * 0.99, 0.1, 10, 10, history) > 3.0


def test_history_with_the_same_sigma_is_merged():
    # The planned rounds may reuse the history's (σ, q): the accountant merges the groups.
    history = schedule(((1.0, 0.1, 50),))

    sigma = calibrate_noise_multiplier(6.0, DELTA, 0.1, 10, 5, history=history)

    assert planned_epsilon(sigma, 0.1, 10, 5, history) <= 6.0


def test_spent_history_is_exhausted():
    history = schedule(((0.7, 0.2, 300),))
    assert epsilon_for(history, DELTA) > 2.0

    with pytest.raises(BudgetExhaustedError, match="already trained spend epsilon=") as err:
        calibrate_noise_multiplier(2.0, DELTA, 0.1, 10, 5, history=history)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_unreachable_target_is_exhausted(accountant):
    # Full batch, 1000 steps, ε = 0.01 would need σ ≈ 10^4.
    with pytest.raises(BudgetExhaustedError, match="even at noise multiplier 1000"):
        calibrate_noise_multiplier(0.01, DELTA, 1.0, 10, 100, accountant=accountant)


def test_max_noise_multiplier_is_configurable():
    with pytest.raises(BudgetExhaustedError, match=r"even at noise multiplier 1\.5"):
        calibrate_noise_multiplier(1.0, DELTA, 0.1, 10, 20, max_noise_multiplier=1.5)


def test_generous_target_stops_at_the_smallest_searched_sigma():
    sigma = calibrate_noise_multiplier(1e6, DELTA, 0.01, 1, 1, accountant="rdp")

    assert sigma == 0.01


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": float("inf")}, "target_epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1}, "sample_rate"),
        ({"steps_per_round": 0}, "steps_per_round"),
        ({"rounds": 2.0}, "rounds"),
        ({"rtol": -1.0}, "rtol"),
    ],
)
def test_invalid_arguments_are_refused(kwargs, match):
    args = {
        "target_epsilon": 3.0,
        "delta": DELTA,
        "sample_rate": 0.1,
        "steps_per_round": 10,
        "rounds": 5,
    } | kwargs

    with pytest.raises(PrivacyError, match=match):
        calibrate_noise_multiplier(**args)


def test_unknown_accountant_is_a_config_error():
    with pytest.raises(ConfigError, match="valid accountants: prv, rdp"):
        calibrate_noise_multiplier(3.0, DELTA, 0.1, 10, 5, accountant="moments")


def test_epsilon_after_adds_the_event():
    history = schedule(((1.0, 0.1, 50),))
    nxt = event(round=7, noise_multiplier=1.2, steps=10)

    assert epsilon_after(history, nxt, DELTA) == epsilon_for([*history, nxt], DELTA)
    assert epsilon_after(history, nxt, DELTA) > epsilon_for(history, DELTA)
    assert epsilon_after((), nxt, DELTA, "rdp") == epsilon_for([nxt], DELTA, "rdp")


def test_memoised_calibration_is_the_fresh_answer_and_skips_the_search(monkeypatch):
    """A second device with the same question (history in another order and under other
    names included) gets the very σ a fresh search gives, without a single accountant call."""
    import time

    from fedlora.privacy import calibrate as cal
    from fedlora.privacy.accountants import registry

    history = [
        DPSGDEvent(device="a", round=1, noise_multiplier=1.3, sample_rate=0.05, steps=10,
                   delta=1e-5),
        DPSGDEvent(device="a", round=2, noise_multiplier=1.1, sample_rate=0.05, steps=10,
                   delta=1e-5),
    ]  # fmt: skip
    args = (8.0, 1e-5, 0.05, 10, 3)
    cal._calibrate.cache_clear()
    started = time.perf_counter()
    first = cal.calibrate_noise_multiplier(*args, history=history)
    fresh_s = time.perf_counter() - started

    calls = []
    real = registry.epsilon_for
    monkeypatch.setattr(cal, "epsilon_for", lambda *a, **k: calls.append(1) or real(*a, **k))
    other = [
        DPSGDEvent(device="b", round=7, noise_multiplier=e.noise_multiplier,
                   sample_rate=e.sample_rate, steps=e.steps, delta=e.delta)
        for e in reversed(history)
    ]  # fmt: skip
    started = time.perf_counter()
    again = cal.calibrate_noise_multiplier(*args, history=other)
    cached_s = time.perf_counter() - started
    assert again == first and calls == []
    assert cached_s < fresh_s / 10

    # ... and equals a search that never saw the cache (to the bit, so well within 1e-6).
    cal._calibrate.cache_clear()
    assert cal.calibrate_noise_multiplier(*args, history=history) == first
    assert calls, "a fresh search consults the accountant"
    # A different history is a different question.
    changed = [*history[:1], DPSGDEvent(device="a", round=2, noise_multiplier=0.9,
                                        sample_rate=0.05, steps=10, delta=1e-5)]  # fmt: skip
    assert cal.calibrate_noise_multiplier(*args, history=changed) > first


# σ as calibrate_noise_multiplier returned it before the accountant was made faster
# (commit 88fe0fb, 2026-12-02): (target ε, q, steps per round, rounds, history, accountant, σ).
# The first four are questions the default `make run` asked (its device-0000 with three
# rounds spent, and round 1 of two others).
_HISTORIES = {
    "none": (),
    "one": ((1.1, 0.1, 10),),
    "default3": ((0.7379, 0.0808, 10), (0.7378, 0.0808, 10), (0.7377, 0.0808, 10)),
    "mixed": ((2.0, 0.05, 30), (1.5, 0.2, 10)),
    "light": ((4.0, 0.02, 25),),
}
RECORDED = [
    (8.0, 0.08080808080808081, 10, 5, "none", "prv", 0.7379),
    (8.0, 0.26229508196721313, 10, 4, "one", "prv", 1.301),
    (8.0, 0.08080808080808081, 10, 1, "default3", "prv", 0.659),
    (8.0, 0.08080808080808081, 10, 2, "default3", "prv", 0.7376),
    (3.0, 0.1, 10, 20, "none", "prv", 2.184),
    (3.0, 0.1, 10, 10, "mixed", "prv", 2.789),
    (1.0, 0.02, 25, 8, "none", "prv", 1.379),
    (1.0, 0.02, 25, 8, "light", "prv", 1.383),
    (2.0, 1.0, 5, 3, "none", "prv", 7.762),
    (0.5, 0.01, 50, 10, "none", "prv", 1.819),
    (16.0, 0.3, 10, 5, "mixed", "prv", 0.9809),
    (8.0, 0.1, 10, 5, "default3", "rdp", 1.86),
    (3.0, 0.1, 10, 20, "none", "rdp", 2.337),
    (3.0, 0.02, 25, 8, "mixed", "rdp", 2.303),
]


@pytest.mark.parametrize(
    ("target", "q", "steps", "rounds", "history", "accountant", "before"), RECORDED
)
def test_calibrated_sigma_is_what_it_was_before_the_speedups(
    target, q, steps, rounds, history, accountant, before
):
    from fedlora.privacy import calibrate as cal
    from fedlora.privacy.accountants import prv

    cal._calibrate.cache_clear()
    prv.prv_epsilon_bounds.cache_clear()
    spent = schedule(_HISTORIES[history])

    sigma = calibrate_noise_multiplier(
        target, DELTA, q, steps, rounds, history=spent, accountant=accountant
    )

    assert sigma == pytest.approx(before, rel=1e-6, abs=0)
    assert planned_epsilon(sigma, q, steps, rounds, spent, accountant) <= target
