"""The round state a resumed run continues from: written last, checked before use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedlora.errors import ConfigError
from fedlora.privacy import DPSGDEvent, PrivacyLedger
from fedlora.server.app import _keep_metrics, resumable_run
from fedlora.server.checkpoint import save_checkpoint
from fedlora.server.resume import (
    RunState,
    config_digest,
    file_digest,
    load_ledger_prefix,
    load_state,
)

SETTINGS = {"format": "fedlora.config", "version": 3, "seed": 4, "training": {"rounds": 3}}


def _event(device: str, rnd: int, run: str = "7") -> DPSGDEvent:
    return DPSGDEvent(
        device=device,
        round=rnd,
        noise_multiplier=1.0,
        sample_rate=0.1,
        steps=5,
        delta=1e-5,
        run=run,
    )


def _committed(run_dir: Path, settings: dict = SETTINGS, *, rnd: int = 1) -> RunState:
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3)]
    ckpt = save_checkpoint(run_dir / "checkpoints", rnd, ["a"], arrays)
    ledger = PrivacyLedger([_event("d0", 1), _event("d1", 1)])
    (run_dir / "privacy").mkdir(parents=True, exist_ok=True)
    ledger.save(run_dir / "privacy" / "ledger.json")
    rng = np.random.default_rng(4)
    rng.random(3)
    state = RunState(
        round=rnd,
        rounds=3,
        checkpoint=ckpt.relative_to(run_dir).as_posix(),
        checkpoint_sha256=file_digest(ckpt),
        ledger_events=len(ledger),
        ledger_sha256=ledger.to_dict()["sha256"],
        rng=dict(rng.bit_generator.state),
        config_sha256=config_digest(settings),
        segments=["7"],
        declined=["d5"],
        wall_s=12.5,
    )
    state.save(run_dir)
    return state


def test_state_round_trips_and_restores_the_sampler_exactly(tmp_path):
    state = _committed(tmp_path)
    loaded = load_state(tmp_path, SETTINGS)
    assert loaded == state and loaded.next_round == 2
    # The restored generator draws what the original would have drawn next.
    original = np.random.default_rng(4)
    original.random(3)
    restored = np.random.default_rng(0)
    restored.bit_generator.state = loaded.rng
    assert restored.choice(50, size=5, replace=False).tolist() == (
        original.choice(50, size=5, replace=False).tolist()
    )


def test_an_edited_state_file_is_refused(tmp_path):
    _committed(tmp_path)
    path = tmp_path / "state.json"
    data = json.loads(path.read_text())
    data["state"]["round"] = 2  # skip a round
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="checksum mismatch"):
        load_state(tmp_path, SETTINGS)


def test_a_state_for_another_config_is_refused(tmp_path):
    _committed(tmp_path)
    other = {**SETTINGS, "seed": 5}
    with pytest.raises(ConfigError, match="not the config the run started with"):
        load_state(tmp_path, other)


def test_a_half_written_checkpoint_is_never_loaded(tmp_path):
    state = _committed(tmp_path)
    ckpt = tmp_path / state.checkpoint
    ckpt.write_bytes(ckpt.read_bytes()[:-7])  # a torn write
    with pytest.raises(ConfigError, match="does not match its recorded sha256"):
        load_state(tmp_path, SETTINGS)
    ckpt.unlink()
    with pytest.raises(ConfigError, match="missing"):
        load_state(tmp_path, SETTINGS)


def test_a_run_without_state_says_it_cannot_resume(tmp_path):
    with pytest.raises(ConfigError, match=r"no state\.json"):
        load_state(tmp_path, SETTINGS)


def test_the_ledger_must_still_hold_every_committed_event(tmp_path):
    state = _committed(tmp_path)
    path = tmp_path / "privacy" / "ledger.json"
    # More than committed is fine: spend recorded in the round the crash cut.
    PrivacyLedger([_event("d0", 1), _event("d1", 1), _event("d0", 2)]).save(path)
    assert len(load_ledger_prefix(path, state)) == 3
    # Fewer is not: resuming would under-count.
    PrivacyLedger([_event("d0", 1)]).save(path)
    with pytest.raises(ConfigError, match="lacks events committed by round 1"):
        load_ledger_prefix(path, state)
    # Nor are the same number of different events.
    PrivacyLedger([_event("d0", 1), _event("d2", 1)]).save(path)
    with pytest.raises(ConfigError, match="lacks events"):
        load_ledger_prefix(path, state)
    # A tampered ledger is refused by its own checksum.
    data = json.loads(path.read_text())
    data["events"][0]["noise_multiplier"] = 9.0
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="checksum"):
        load_ledger_prefix(path, state)


def test_metrics_of_the_cut_round_are_set_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"round": r, "eval_loss": 4.0 - r} for r in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"round": 3, "eval')
    kept = _keep_metrics(path, 1)
    assert [r["round"] for r in kept] == [0, 1]
    assert [json.loads(x)["round"] for x in path.read_text().splitlines()] == [0, 1]
    superseded = (tmp_path / "metrics-superseded.jsonl").read_text().splitlines()
    assert json.loads(superseded[0])["round"] == 2 and superseded[1].startswith('{"round": 3')
    with pytest.raises(ConfigError, match=r"not 0\.\.4 as committed"):
        _keep_metrics(path, 4)


def _run_dir(tmp_path: Path, status: str) -> Path:
    from fedlora.config import FedloraConfig

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    settings = FedloraConfig().to_dict()
    (run_dir / "config.json").write_text(json.dumps({**settings, "versions": {"x": "1"}}))
    (run_dir / "run.json").write_text(json.dumps({"format": "fedlora.run", "status": status}))
    _committed(run_dir, settings)
    return run_dir


@pytest.mark.parametrize(
    ("status", "message"),
    [("complete", "already complete"), ("running", "only a run cut off by a crash")],
)
def test_only_a_cut_off_run_is_resumed(tmp_path, status, message):
    run_dir = _run_dir(tmp_path, status)
    with pytest.raises(ConfigError, match=message):
        resumable_run(run_dir, statuses=("interrupted", "failed"))


def test_an_interrupted_run_resumes_with_its_own_config(tmp_path):
    run_dir = _run_dir(tmp_path, "interrupted")
    cfg, state = resumable_run(run_dir, statuses=("interrupted", "failed"))
    assert state.round == 1 and cfg.seed == 0
    with pytest.raises(ConfigError, match="holds no run"):
        resumable_run(tmp_path / "nothing", statuses=("interrupted",))
