"""End to end: ``fedlora audit`` on a tiny fleet; its bound stays under the claim with DP,
and far above it when the DP noise is switched off (a test-only fault).

The fleet is 3 devices whose notes are scaled to a tenth (about 10 records each), so a
canary is in most Poisson batches, with the per-record clipping norm raised to 10: the
noise is σ·C, so ε is unchanged, while a noiseless run memorizes inserted canaries
within 30 steps. 64 canaries can show at most ε ≈ 2.6 at δ = 1e-5 (with the confidence
split among 4 choices of k): the claim audited for power is ε = 0.5.
"""

from __future__ import annotations

import json

import pytest

from fedlora.config import FedloraConfig

pytestmark = pytest.mark.slow  # simulations: not in `make unit`


def tiny_config(epsilon: float, seed: int = 0, rounds: int = 3) -> FedloraConfig:
    return FedloraConfig().replace(
        fleet={
            "num_devices": 3,
            "devices_per_round": 3,
            "min_devices": 3,
            "profiles": [{"name": "small", "share": 1.0, "data_scale": 0.1}],
        },
        training={"rounds": rounds, "local_steps": 10},
        privacy={"epsilon": epsilon, "max_grad_norm": 10.0},
        export={"enabled": False},
        seed=seed,
    )


def _audit(tmp_path, cfg, canaries, mods=()):
    from fedlora import runtime
    from fedlora.audit.run import run_audit

    try:
        return run_audit(
            cfg, tmp_path / "audit", canaries=canaries, show_progress=False, client_mods=mods
        )
    finally:
        runtime.clear()


def test_cli_audit_writes_the_bound_and_the_report_shows_it(tmp_path, capsys):
    from fedlora import runtime
    from fedlora.cli import main

    config = tmp_path / "cfg.json"
    cfg = tiny_config(8.0, rounds=1)
    config.write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "audit"
    try:
        code = main(["audit", "--out", str(out), "--config", str(config), "--canaries", "32"])
    finally:
        runtime.clear()
    assert code == 0
    printed = capsys.readouterr().out
    assert "audit: ε ≥ " in printed and "claimed ε = " in printed

    audit = json.loads((out / "audit.json").read_text())
    claimed = audit["claimed"]
    assert claimed["delta"] == 1e-5 and claimed["accountant"] == "prv"
    assert 7.9 < claimed["epsilon"] <= 8.0
    assert audit["canaries"] == 32 and len(audit["canary_scores"]) == 32
    assert audit["included"] == sum(c["included"] for c in audit["canary_scores"])
    assert 0 <= audit["correct"] <= audit["guesses"] <= 32
    assert 0.0 <= audit["epsilon_lower_bound"] <= audit["max_possible"] < claimed["epsilon"]
    assert audit["confidence"] == 0.95
    # every canary was inserted into its device's training records, or not at all
    ledger = json.loads((out / "privacy" / "ledger.json").read_text())
    events = ledger["events"] if isinstance(ledger, dict) else ledger
    assert {e["device"] for e in events} == {"device-0000", "device-0001", "device-0002"}
    # the report carries it, and shows it beside the claim
    report = json.loads((out / "privacy" / "report.json").read_text())
    assert report["audit"]["epsilon_lower_bound"] == audit["epsilon_lower_bound"]
    assert main(["report", str(out), "--format", "md", "--quiet"]) == 0
    md = capsys.readouterr().out
    assert "## Empirical audit" in md and "measured lower bound: ε ≥ " in md
    # an audit run cannot be resumed without its canaries
    assert main(["simulate", "--resume", str(out)]) != 0
    assert "fedlora audit" in capsys.readouterr().err


@pytest.mark.scale
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_with_dp_the_bound_stays_under_the_claim(tmp_path, seed):
    audit = _audit(tmp_path, tiny_config(1.0, seed=seed), canaries=64)
    assert audit["epsilon_lower_bound"] <= audit["claimed"]["epsilon"]


# In make test: the audit's power (a run without its noise is caught), the check that can
# fail; the CLI test's ε = 8 bound cannot exceed what its 32 canaries can show.
def test_without_noise_the_bound_refutes_the_claim(tmp_path):
    from fedlora.testing.faults import noiseless_mod

    audit = _audit(tmp_path, tiny_config(0.5), canaries=64, mods=[noiseless_mod()])
    # the devices still believe they spent ε = 0.5: the audit shows at least twice that
    assert audit["claimed"]["epsilon"] == pytest.approx(0.5, abs=1e-3)
    assert audit["epsilon_lower_bound"] > 2 * audit["claimed"]["epsilon"]
