"""The simulation's calibration prefetch: the devices' own answers, computed ahead.

Each (device, round) the coordinator will sample is calibrated in round order against
the history the device will have then, and filed where the simulated devices read it;
a device that reads it trains with exactly the σ its own search returns.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fedlora import runtime
from fedlora.client.device_client import plan_noise
from fedlora.config import FedloraConfig
from fedlora.privacy import DPSGDEvent, PrivacyLedger
from fedlora.privacy import calibrate as cal
from fedlora.privacy.calibration_cache import ENV, SharedCalibrations
from fedlora.privacy.events import poisson_sample_rate
from fedlora.server.sampling import forecast
from fedlora.simprefetch import Prefetch, forecast_calibrations, prefetch

ROUNDS = 3


def small(**privacy: object) -> FedloraConfig:
    return FedloraConfig().replace(
        fleet={"num_devices": 8, "devices_per_round": 4, "min_devices": 3},
        training={"rounds": ROUNDS, "local_steps": 2, "batch_size": 8},
        privacy={"epsilon": 4.0, **privacy},
        seed=5,
    )


def devices_plan(cfg: FedloraConfig, shared: SharedCalibrations | None) -> list[tuple]:
    """What the forecast devices calibrate, through the device's own plan_noise."""
    ledger = PrivacyLedger()
    q = {}
    for i in range(cfg.fleet.num_devices):
        device, records = runtime.device_info(cfg, i)
        q[device] = poisson_sample_rate(cfg.training.batch_size, records)
    out = []
    for rnd, chosen in enumerate(forecast(cfg, sorted(q), ROUNDS), 1):
        for device in chosen:
            sigma = plan_noise(cfg, ledger, device, rnd, ROUNDS, q[device], shared=shared)
            assert sigma is not None
            event = DPSGDEvent(
                device=device,
                round=rnd,
                noise_multiplier=sigma,
                sample_rate=q[device],
                steps=2,
                delta=cfg.privacy.delta,
            )
            ledger.append(event)
            out.append((rnd, device, sigma))
    return out


def test_nothing_is_forecast_without_calibrated_record_level_dp():
    assert list(forecast_calibrations(small(noise_multiplier=1.0))) == []
    assert list(forecast_calibrations(small(enabled=False))) == []
    assert len(list(forecast_calibrations(small()))) == 4 * ROUNDS


def test_devices_find_every_answer_filed_and_it_is_their_own_searchs(tmp_path, monkeypatch):
    cfg = small()
    counts = prefetch(cfg, tmp_path)
    cal._calibrate.cache_clear()
    fresh = devices_plan(cfg, shared=None)  # the devices searching for themselves

    def no_search(*args):
        raise AssertionError("a device searched although the prefetch filed its answer")

    monkeypatch.setattr(cal, "_calibrate", no_search)
    read = devices_plan(cfg, shared=SharedCalibrations(tmp_path))

    assert counts == {"calibrated": 4 * ROUNDS, "declined": 0}
    assert read == fresh
    assert len({sigma for _, _, sigma in fresh}) > 4  # histories differ: not one σ for all


def _nice(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])  # field 19: nice


def test_the_process_runs_at_lowest_priority_files_answers_and_is_cleaned_up(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    ahead = Prefetch(small()).start()
    try:
        assert ahead.process is not None and ahead.root is not None
        assert _nice(ahead.process.pid) == 19
        cache = Path(os.environ[ENV])
        assert cache.parent == ahead.root and oct(cache.stat().st_mode & 0o777) == "0o700"
        deadline = time.monotonic() + 120
        while ahead.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ahead.process.returncode == 0, (ahead.root / "prefetch.log").read_text()
        assert len(list(cache.glob("*.json"))) == 4 * ROUNDS
        root = ahead.root
    finally:
        ahead.stop()
    assert ENV not in os.environ and not root.exists()


def test_a_run_that_is_still_prefetching_stops_it(monkeypatch):
    monkeypatch.setenv(ENV, "/somewhere/else")
    cfg = small().replace(fleet={"num_devices": 200, "devices_per_round": 100})
    ahead = Prefetch(cfg).start()
    assert ahead.process is not None
    process, root = ahead.process, ahead.root
    assert process.poll() is None

    ahead.stop()

    assert process.returncode is not None and not root.exists()  # type: ignore[union-attr]
    assert os.environ[ENV] == "/somewhere/else"  # the user's own value is put back


@pytest.mark.parametrize("privacy", [{"noise_multiplier": 1.0}, {"enabled": False}])
def test_no_process_where_nothing_is_calibrated(monkeypatch, privacy):
    monkeypatch.delenv(ENV, raising=False)
    with Prefetch(small(**privacy)) as ahead:
        assert ahead.process is None and ENV not in os.environ


def test_a_prefetch_that_fails_is_said_in_one_line_and_costs_nothing_else(monkeypatch, caplog):
    import subprocess
    import sys

    def failing(config, cache, log):
        code = "import sys; print('ConfigError: no such thing', file=sys.stderr); sys.exit(3)"
        return subprocess.Popen((sys.executable, "-c", code), stderr=log)

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(Prefetch, "_spawn", staticmethod(failing))
    ahead = Prefetch(small()).start()
    assert ahead.process is not None
    ahead.process.wait(timeout=30)

    with caplog.at_level("WARNING", logger="fedlora.simulate"):
        ahead.stop()

    assert caplog.messages == [
        "the calibration prefetch failed (exit 3): ConfigError: no such thing"
    ]
    assert ENV not in os.environ


def test_a_run_that_fails_says_its_own_error_not_the_prefetchs(monkeypatch, caplog):
    import subprocess
    import sys

    def failing(config, cache, log):
        return subprocess.Popen((sys.executable, "-c", "raise SystemExit(3)"), stderr=log)

    monkeypatch.setattr(Prefetch, "_spawn", staticmethod(failing))
    ahead = Prefetch(small())
    with (
        caplog.at_level("WARNING", logger="fedlora.simulate"),
        pytest.raises(ValueError, match="own error"),
        ahead,
    ):
        assert ahead.process is not None
        ahead.process.wait(timeout=30)
        raise ValueError("the run's own error")

    assert caplog.messages == []
