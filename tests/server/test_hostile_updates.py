"""The checks an update must pass before aggregation, one by one, and fuzzed: whatever
arrives, the only failure is the documented rejection and the aggregate stays finite."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import Parameters, parameters_to_ndarrays
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from fedlora.errors import UpdateError
from fedlora.privacy import DPSGDEvent
from fedlora.server.aggregate import (
    NORM_RTOL,
    REASONS,
    UpdateRejected,
    l2_norm,
    secagg_error_bound,
    validate_claims,
    validate_event,
    validate_num_examples,
    validate_update,
)
from tests.server.test_strategy_rejects import (
    _DROP,
    SHAPES,
    aggregate,
    make_strategy,
    result,
    secagg_results,
)

# ------------------------------------------------------------------ validate_update
SHAPES_23 = [(2, 3), (3,)]
GOOD = [np.full((2, 3), 0.5, np.float32), np.zeros(3, np.float32)]


def _reason(arrays: list[Any], **kwargs: Any) -> str:
    with pytest.raises(UpdateRejected) as info:
        validate_update(arrays, SHAPES_23, **kwargs)
    return info.value.reason


@pytest.mark.parametrize(
    ("arrays", "kwargs", "reason"),
    [
        ([], {}, "tensor_count"),
        ([GOOD[0]], {}, "tensor_count"),
        ([*GOOD, GOOD[1]], {}, "tensor_count"),
        ([GOOD[0].reshape(3, 2), GOOD[1]], {}, "shape"),
        ([GOOD[0], np.zeros((1, 3), np.float32)], {}, "shape"),
        ([GOOD[0], np.float32(0.0)], {}, "dtype"),  # a numpy scalar, not an array
        ([GOOD[0], [0.0, 0.0, 0.0]], {}, "dtype"),  # a list
        ([GOOD[0], None], {}, "dtype"),
        ([GOOD[0], np.ma.masked_invalid(np.array([np.nan, 0, 0], np.float32))], {}, "dtype"),
        ([GOOD[0], GOOD[1].astype(">f4")], {}, "dtype"),  # big-endian float32
        ([GOOD[0], GOOD[1].astype(np.float64)], {}, "dtype"),
        ([GOOD[0], GOOD[1].astype(np.complex64)], {}, "dtype"),
        (GOOD, {"dtype": np.float64}, "dtype"),
        ([GOOD[0], np.array([0, np.nan, 0], np.float32)], {}, "non_finite"),
        ([GOOD[0], np.array([0, -np.inf, 0], np.float32)], {}, "non_finite"),
        ([GOOD[0], np.array([0, 8.001, 0], np.float32)], {"max_abs": 8.0}, "out_of_range"),
        ([GOOD[0], np.array([-9, 0, 0], np.float32)], {"max_abs": 8.0}, "out_of_range"),
        (GOOD, {"max_norm": 1.2}, "norm"),  # √(6·0.25) = 1.22
        (  # the sum of squares overflows float64: an infinite norm is above any bound
            [GOOD[0].astype(np.float64), np.array([1e200, 1e200, 0])],
            {"dtype": np.float64, "max_norm": 1e300},
            "norm",
        ),
    ],
)
def test_each_defect_is_rejected_with_its_reason(arrays, kwargs, reason):
    assert _reason(arrays, **kwargs) == reason


def test_values_on_the_bounds_are_accepted():
    at_edge = [GOOD[0], np.array([8.0, -8.0, 0], np.float32)]
    validate_update(at_edge, SHAPES_23, max_abs=8.0)
    norm = l2_norm(GOOD)
    assert norm == pytest.approx(math.sqrt(1.5))
    validate_update(GOOD, SHAPES_23, max_norm=norm)
    validate_update(GOOD, SHAPES_23, max_norm=norm / (1 + NORM_RTOL / 2))
    with pytest.raises(UpdateRejected):
        validate_update(GOOD, SHAPES_23, max_norm=norm / (1 + 2 * NORM_RTOL))
    validate_update([a.astype(np.float64) for a in GOOD], SHAPES_23, dtype=np.float64)


def test_rejections_are_update_errors_with_a_known_reason():
    with pytest.raises(UpdateError, match="tensor 1 contains NaN or Inf"):
        validate_update([GOOD[0], np.full(3, np.nan, np.float32)], SHAPES_23, who="u")
    with pytest.raises(ValueError, match="unknown rejection reason"):
        UpdateRejected("bad-luck", "x")


def test_l2_norm_overflow_is_infinite_not_an_error():
    assert l2_norm([np.array([1e200, 1e200])]) == math.inf
    assert l2_norm([np.array([3.0], np.float32), np.array([[4.0]], np.float32)]) == 5.0


# ------------------------------------------------------------------ claims and counts
CLAIMS = {"device": "d1", "round": 3, "run": "7", "dp": True}


@pytest.mark.parametrize(
    ("metrics", "known", "reason"),
    [
        ("not a mapping", None, "metrics"),
        ({**CLAIMS, "device": ""}, None, "metrics"),
        ({**CLAIMS, "device": b"d1"}, None, "metrics"),
        ({**CLAIMS, "round": 3.0}, None, "metrics"),
        ({**CLAIMS, "round": False}, None, "metrics"),
        ({**CLAIMS, "run": 7}, None, "metrics"),
        ({**CLAIMS, "dp": 1}, None, "metrics"),
        ({k: v for k, v in CLAIMS.items() if k != "dp"}, None, "metrics"),
        ({**CLAIMS, "round": 4}, None, "round"),
        ({**CLAIMS, "run": "8"}, None, "run"),
        (CLAIMS, "d2", "device"),
    ],
)
def test_claims_that_do_not_hold_are_rejected(metrics, known, reason):
    with pytest.raises(UpdateRejected) as info:
        validate_claims(metrics, "u", server_round=3, run="7", known_device=known)
    assert info.value.reason == reason


def test_claims_that_hold_name_the_device():
    assert validate_claims(CLAIMS, "u", server_round=3, run="7", known_device="d1") == "d1"
    # An unknown run id (not passed to the strategy) and an unknown node: only types are checked.
    assert validate_claims(CLAIMS, "u", server_round=3, run=None, known_device=None) == "d1"


@pytest.mark.parametrize("n", [0, -1, True, 2.0, "5", None, 101])
def test_example_counts_outside_what_the_device_reported_are_rejected(n):
    with pytest.raises(UpdateRejected) as info:
        validate_num_examples(n, "u", at_most=100)
    assert info.value.reason == "num_examples"


def test_example_count_within_bounds_is_the_weight():
    assert validate_num_examples(100, "u", at_most=100) == 100
    assert validate_num_examples(10**9, "u", at_most=None) == 10**9


# ------------------------------------------------------------------ DP-SGD events
EVENT = {**CLAIMS, "noise_multiplier": 2.0, "sample_rate": 0.16, "steps": 10, "delta": 1e-5}


def _event(metrics, *, num_examples=100, sigma=None, history=(), budget=8.0):
    return validate_event(
        metrics,
        "d1",
        num_examples,
        "u",
        steps=10,
        batch_size=16,
        delta=1e-5,
        noise_multiplier=sigma,
        accountant="rdp",
        history=history,
        budget=budget,
    )


def test_a_consistent_event_is_returned_as_the_ledger_will_hold_it():
    event = _event(EVENT)
    assert event == DPSGDEvent(
        device="d1",
        round=3,
        noise_multiplier=2.0,
        sample_rate=0.16,
        steps=10,
        delta=1e-5,
        run="7",
    )


@pytest.mark.parametrize(
    ("changes", "kwargs", "match"),
    [
        ({"steps": 11}, {}, "steps 11, expected 10"),
        ({"steps": 10.0}, {}, "incomplete"),
        ({"delta": 1e-6}, {}, "delta"),
        ({"sample_rate": 0.5}, {}, "sample_rate 0.5, expected 0.16"),
        ({"sample_rate": 0.16}, {"num_examples": 50}, "expected 0.32"),
        ({"noise_multiplier": 2.5}, {"sigma": 2.0}, "noise_multiplier 2.5, expected 2.0"),
        ({"noise_multiplier": 0}, {}, "incomplete"),
        ({"noise_multiplier": float("inf")}, {}, "incomplete"),
        ({"noise_multiplier": 1e-9}, {}, "cannot be accounted|past its budget"),
        ({"noise_multiplier": 0.5}, {"budget": 1.0}, "past its budget 1"),
    ],
)
def test_events_this_run_could_not_produce_are_rejected(changes, kwargs, match):
    with pytest.raises(UpdateRejected, match=match) as info:
        _event({**EVENT, **changes}, **kwargs)
    assert info.value.reason == "privacy_event"


def test_a_missing_event_field_is_rejected():
    metrics = {k: v for k, v in EVENT.items() if k != "sample_rate"}
    with pytest.raises(UpdateRejected, match="incomplete") as info:
        _event(metrics)
    assert info.value.reason == "privacy_event"


def test_the_budget_check_includes_the_history_the_coordinator_holds():
    history = tuple(
        DPSGDEvent(
            device="d1", round=r, noise_multiplier=2.0, sample_rate=0.16, steps=10, delta=1e-5
        )
        for r in (1, 2)
    )
    # RDP: one such round is ε ≈ 1.19 at δ = 1e-5, three are ≈ 2.2.
    _event(EVENT, budget=1.5)
    with pytest.raises(UpdateRejected, match="past its budget"):
        _event(EVENT, budget=1.5, history=history)


# ------------------------------------------------------------------ SecAgg+ error bound
def test_secagg_error_bound_matches_hand_computed_values():
    # round(50/80·2^22) + round(80/80·2^22) + round(64/80·2^22) = 10,171,187 levels
    got = secagg_error_bound([50, 80, 64], 80.0, 64.0, 2**22)
    assert got == pytest.approx(3 * 2 * 64 / 10_171_187, rel=1e-12)
    assert secagg_error_bound([1], 1e9, 8.0, 2**22) == math.inf  # scales round to 0


# ------------------------------------------------------------------ fuzzing
DTYPES = [
    np.float32,
    np.float64,
    np.float16,
    np.int32,
    np.int8,
    np.uint8,
    np.bool_,
    np.complex64,
]


@st.composite
def tensor_lists(
    draw: st.DrawFn, shapes: list[tuple[int, ...]], usual: type = np.float32
) -> list[np.ndarray]:
    """Mostly the right count, shapes and dtype (so the value checks are reached), else
    anything; any values a dtype can hold: NaN, ±Inf, subnormals, the largest."""
    count = draw(st.sampled_from([len(shapes)] * 12 + [0, 1, len(shapes) + 1]))
    out = []
    for i in range(count):
        right = i < len(shapes) and draw(st.sampled_from([True] * 9 + [False]))
        shape = shapes[i] if right else draw(array_shapes(min_dims=0, max_dims=3, max_side=5))
        dtype = np.dtype(draw(st.sampled_from([usual] * 8 + DTYPES)))
        elements = None  # hypothesis' default: anything the dtype holds
        if dtype.kind == "f":
            width = 8 * dtype.itemsize
            regime = draw(st.sampled_from(["small", "small", "large", "poisoned", "any"]))
            small = st.floats(-0.25, 0.25, width=width)  # an honest update's values
            if regime == "small":
                elements = small
            elif regime == "large":  # finite, but past the range or the norm bound
                elements = st.floats(-128, 128, width=width)
            elif regime == "poisoned":  # honest values and the odd NaN or Inf
                elements = small | st.sampled_from([math.nan, math.inf, -math.inf])
        out.append(draw(arrays(dtype, shape, elements=elements)))
    return out


@settings(max_examples=200, deadline=1000)
@given(
    tensors=tensor_lists([(2, 3), (3,)]),
    max_abs=st.none() | st.floats(0.0, 100.0),
    max_norm=st.none() | st.floats(1e-6, 100.0),
)
def test_fuzzed_updates_are_either_sound_or_rejected_with_a_reason(tensors, max_abs, max_norm):
    try:
        validate_update(tensors, SHAPES_23, max_abs=max_abs, max_norm=max_norm)
    except UpdateRejected as exc:
        assert exc.reason in REASONS
        return
    # Accepted: every promise holds.
    assert [a.shape for a in tensors] == SHAPES_23
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in tensors)
    if max_abs is not None:
        assert all(float(np.max(np.abs(a), initial=0.0)) <= max_abs for a in tensors)
    if max_norm is not None:
        assert l2_norm(tensors) <= max_norm * (1 + NORM_RTOL)


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
    | st.just(_DROP)
)
FIELDS = ["device", "round", "run", "dp", "noise_multiplier", "sample_rate", "steps", "delta"]


@st.composite
def hostile_results(draw: st.DrawFn) -> dict[str, Any]:
    """Keyword arguments of ``result(2, ...)``: fuzzed tensors (or raw bytes), metrics and
    example count; each part is often left honest so the later checks are reached."""
    kwargs: dict[str, Any] = {}
    kind = draw(st.sampled_from(["arrays"] * 6 + ["bytes", "honest"]))
    if kind == "arrays":
        kwargs["arrays"] = draw(tensor_lists(SHAPES))
    elif kind == "bytes":
        blobs = draw(st.lists(st.binary(max_size=64), min_size=0, max_size=3))
        kwargs["parameters"] = Parameters(blobs, "numpy.ndarray")
    if draw(st.sampled_from([False] * 3 + [True])):
        kwargs.update(draw(st.dictionaries(st.sampled_from(FIELDS), SCALARS, max_size=2)))
    if draw(st.sampled_from([False] * 5 + [True])):
        kwargs["num_examples"] = draw(st.integers(-(2**63), 2**63) | st.booleans())
    return kwargs


def _baseline() -> list[np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        params, _ = aggregate(make_strategy(Path(tmp)), [result(1), result(3)])
        assert params is not None
        return parameters_to_ndarrays(params)


BASELINE = _baseline()


@settings(
    max_examples=80,
    deadline=5000,  # a hostile σ costs the accountant about 2 s at worst
    suppress_health_check=[HealthCheck.too_slow],
)
@given(bad=hostile_results())
def test_fuzzed_results_never_break_aggregate_fit_or_poison_the_aggregate(bad):
    with tempfile.TemporaryDirectory() as tmp:
        strategy = make_strategy(Path(tmp))

        params, row = aggregate(strategy, [result(1), result(2, **bad), result(3)])

    assert params is not None  # the two honest updates always make a round
    got = parameters_to_ndarrays(params)
    assert all(g.dtype == np.float32 and np.isfinite(g).all() for g in got)
    assert set(row["rejected_by_reason"]) <= set(REASONS)
    if row["rejected"]:
        assert row["num_devices"] == 2
        for g, b in zip(got, BASELINE, strict=True):
            np.testing.assert_array_equal(g, b)
    else:
        assert row["num_devices"] == 3
        # Accepted: within what two honest updates and one bounded one can move it.
        moved = l2_norm([g - b for g, b in zip(got, BASELINE, strict=True)])
        assert moved <= 2 * 2.0 * (1 + NORM_RTOL) + 1e-5


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(
    aggregate_arrays=tensor_lists(SHAPES, usual=np.float64),
    changes=st.lists(
        st.sampled_from([{}] * 6) | st.dictionaries(st.sampled_from(FIELDS), SCALARS, max_size=1),
        min_size=3,
        max_size=3,
    ),
)
def test_fuzzed_secagg_rounds_are_applied_only_when_sound(aggregate_arrays, changes):
    with tempfile.TemporaryDirectory() as tmp:
        strategy = make_strategy(Path(tmp), secagg=True)
        before = [a.copy() for a in strategy.global_arrays]

        params, row = aggregate(strategy, secagg_results(aggregate_arrays, *changes))

    if params is None:
        assert row["num_devices"] == 0
        for g, b in zip(strategy.global_arrays, before, strict=True):
            np.testing.assert_array_equal(g, b)
        return
    assert row["rejected"] == 0 and row["num_devices"] == 3
    got = parameters_to_ndarrays(params)
    assert all(g.dtype == np.float32 and np.isfinite(g).all() for g in got)
    moved = l2_norm([g - b for g, b in zip(got, before, strict=True)])
    assert moved <= 2.0 * (1 + NORM_RTOL) + 1e-3
