"""End to end: a simulation SIGKILLed in the middle of a round, resumed with ``--resume``.

Devices seed their DP noise from the run (``privacy.reproducible_noise``), σ is fixed
and aggregation is plain, so a resumed run must reproduce an uninterrupted run from the
same config exactly: same devices sampled each round (the sampler's state is restored),
same global adapter, same eval losses. Its ledger differs in one way only, and must: the
devices that had trained in the round the kill cut spent that budget, so their events of
the killed attempt are in the coordinator's ledger too (recovered from their own
ledgers), beside the events of the round trained again. (SecAgg+'s quantization rounds
stochastically, so it would not reproduce bit for bit; the deployment test resumes a
SecAgg+ run over gRPC.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import ROUNDS, plain_config

pytestmark = pytest.mark.slow


def _device_events(run_dir: Path) -> list:
    from fedlora.privacy import PrivacyLedger

    return [
        e
        for path in sorted((run_dir / "devices").glob("*/ledger.json"))
        for e in PrivacyLedger.load(path).events
    ]


def _kill_in_round(run_dir: Path, config: Path, rnd: int) -> tuple[int, list]:
    """Start `fedlora simulate` and SIGKILL it once a device has trained in ``rnd``."""
    cmd = [sys.executable, "-m", "fedlora.cli", "simulate", "--out", str(run_dir)]
    proc = subprocess.Popen(
        [*cmd, "--config", str(config), "--quiet"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    events: list = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                events = _device_events(run_dir)
            except Exception:  # a ledger being replaced right now: read again
                events = []
            if any(e.round == rnd for e in events):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"no device trained in round {rnd}: {proc.stderr.read()[-2000:]}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.pid, events


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_killed_mid_round_resumes_and_matches_an_uninterrupted_one(plain_run, tmp_path):
    from safetensors.numpy import load_file

    from fedlora import runtime
    from fedlora.privacy import PrivacyLedger, epsilon_for
    from fedlora.simulate import resume_simulation

    config = tmp_path / "config.json"
    _cfg, reference, _summary = plain_run
    config.write_text(json.dumps(plain_config().to_dict()))
    run_dir = tmp_path / "run"
    pid, at_kill = _kill_in_round(run_dir, config, 2)
    state = json.loads((run_dir / "state.json").read_text())["state"]
    assert state["round"] == 1
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    # Ray's processes went with the driver (their session is named after its pid).
    time.sleep(1)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"_{pid}/" not in ps, "the killed simulation left Ray processes behind"

    summary = resume_simulation(run_dir, show_progress=False)
    runtime.clear()

    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "complete" and status["resumed"][0]["at_round"] == 2
    # The same run as without the kill: rows, losses and adapter.
    got, want = _rows(run_dir), _rows(reference)
    assert [r["round"] for r in got] == list(range(ROUNDS + 1))
    for g, w in zip(got, want, strict=True):
        assert g["eval_loss"] == pytest.approx(w["eval_loss"], rel=1e-6, abs=1e-6)
        assert g["sampled"] == w["sampled"]
    a = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert max(float(np.abs(a[n] - b[n]).max()) for n in a) < 1e-6
    assert summary["eval_loss_final"] == pytest.approx(want[-1]["eval_loss"], rel=1e-6)

    # The ledger: exactly what the devices recorded, nothing lost, nothing twice ...
    ledger = PrivacyLedger.load(run_dir / "privacy" / "ledger.json")
    devices = _device_events(run_dir)
    key = lambda e: (e.device, e.run, e.round)  # noqa: E731
    assert sorted(ledger.events, key=key) == sorted(devices, key=key)
    assert len({key(e) for e in ledger.events}) == len(ledger)
    assert {key(e) for e in at_kill} <= {key(e) for e in ledger.events}
    # ... which is the uninterrupted run's ledger plus the killed attempt at round 2.
    first, resumed = state["segments"][0], status["resumed"][0]["flower_run_id"]
    assert first != resumed
    cut = [e for e in ledger.events if e.run == first and e.round == 2]
    assert cut, "the devices that trained in the cut round are not in the ledger"
    assert status["resumed"][0]["recovered"]["recorded"] == len(cut)
    same = lambda e: (e.device, e.round, e.noise_multiplier, e.sample_rate, e.steps)  # noqa: E731
    kept = sorted(same(e) for e in ledger.events if e not in cut)
    assert kept == sorted(
        same(e) for e in PrivacyLedger.load(reference / "privacy" / "ledger.json").events
    )
    # The report's totals are recomputed from each device's own ledger, and say so.
    report = json.loads((run_dir / "privacy" / "report.json").read_text())
    assert report["run"]["resumed_at"] == [2]
    for d in report["devices"]:
        own = [e for e in devices if e.device == d["device"]]
        assert d["epsilon"] == pytest.approx(
            epsilon_for(own, report["delta"], report["accountant"]), rel=1e-9
        )
