"""Calibrated σ shared between a simulation's processes: the same float, or a miss."""

from __future__ import annotations

import json
import math

import pytest

from fedlora.privacy import DPSGDEvent, calibrate_noise_multiplier
from fedlora.privacy import calibrate as cal
from fedlora.privacy.calibration_cache import ENV, SharedCalibrations

KEY = (8.0, 1e-5, 0.08, 10, 3, ((0.7, 0.08, 10, 1e-5),), "prv", 1e-3, 1e3)
HISTORY = [DPSGDEvent(device="d", round=1, noise_multiplier=0.74, sample_rate=0.08, steps=10,
                      delta=1e-5)]  # fmt: skip


def test_an_answer_reads_back_exactly_and_only_for_its_own_question(tmp_path):
    shared = SharedCalibrations(tmp_path)
    sigma = 0.1 + 0.2  # not a short decimal: repr must round-trip it

    shared.put(KEY, sigma)

    assert shared.get(KEY) == sigma
    assert shared.get((*KEY[:-1], 999.0)) is None
    assert [p.suffix for p in tmp_path.iterdir()] == [".json"]  # no temporary file left


@pytest.mark.parametrize(
    "entry",
    ["not json", json.dumps([1]), json.dumps({"question": "other", "sigma": 1.0}), ""],
)
def test_an_unreadable_or_foreign_file_is_a_miss(tmp_path, entry):
    shared = SharedCalibrations(tmp_path)
    shared.put(KEY, 1.0)
    path = next(tmp_path.iterdir())

    path.write_text(entry)

    assert shared.get(KEY) is None


@pytest.mark.parametrize("sigma", [math.nan, math.inf, -1.0, 0.0, True, "1.0", 1])
def test_an_answer_that_is_not_a_finite_positive_float_is_a_miss(tmp_path, sigma):
    shared = SharedCalibrations(tmp_path)
    shared.put(KEY, 1.0)
    path = next(tmp_path.iterdir())
    entry = json.loads(path.read_text())

    path.write_text(json.dumps({**entry, "sigma": sigma}))

    assert shared.get(KEY) is None


def test_a_missing_directory_neither_answers_nor_fails(tmp_path):
    shared = SharedCalibrations(tmp_path / "gone")

    shared.put(KEY, 1.0)

    assert shared.get(KEY) is None


def test_the_environment_names_the_directory_only_if_it_exists(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert SharedCalibrations.from_env() is None
    monkeypatch.setenv(ENV, str(tmp_path / "gone"))
    assert SharedCalibrations.from_env() is None
    monkeypatch.setenv(ENV, str(tmp_path))
    found = SharedCalibrations.from_env()
    assert found is not None and found.directory == tmp_path


def _calibrate(shared=None):
    return calibrate_noise_multiplier(8.0, 1e-5, 0.08, 10, 3, history=HISTORY, shared=shared)


def test_a_search_files_its_answer_and_a_later_process_reads_the_same_float(tmp_path, monkeypatch):
    cal._calibrate.cache_clear()
    fresh = _calibrate()
    cal._calibrate.cache_clear()

    filed = _calibrate(SharedCalibrations(tmp_path))
    cal._calibrate.cache_clear()

    def no_search(*args):
        raise AssertionError("searched although the answer was filed")

    monkeypatch.setattr(cal, "_calibrate", no_search)
    read = _calibrate(SharedCalibrations(tmp_path))
    assert fresh == filed == read
    assert len(list(tmp_path.iterdir())) == 1


def test_a_filed_answer_is_what_the_device_trains_with(tmp_path):
    """The store is trusted as the search itself: a planted σ is returned as is (so only
    a simulation's own directory may be named; a deployed device never reads one)."""
    cal._calibrate.cache_clear()
    shared = SharedCalibrations(tmp_path)
    true = _calibrate(shared)
    path = next(tmp_path.iterdir())
    path.write_text(json.dumps({**json.loads(path.read_text()), "sigma": 2 * true}))

    assert _calibrate(shared) == 2 * true
    assert _calibrate() == true
