"""The privacy report shows an audit beside the claim; audit.json is read strictly."""

import json

import pytest

from fedlora.errors import ConfigError
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.render import audit_lines, render_markdown, render_table
from fedlora.privacy.report import build_report
from fedlora.reporting.audit import AUDIT_FORMAT, audit_summary, read_audit
from fedlora.reporting.html import render_html
from tests.privacy._helpers import event

AUDIT = {
    "format": AUDIT_FORMAT,
    "version": 1,
    "epsilon_lower_bound": 0.4567,
    "confidence": 0.95,
    "delta": 1e-5,
    "canaries": 64,
    "included": 30,
    "guesses": 32,
    "correct": 25,
    "max_possible": 2.6434,
    "claimed": {"epsilon": 7.9971, "delta": 1e-5, "accountant": "prv", "budget_epsilon": 8.0},
    "unit": "one training sequence (record) of one device",
    "score": "loss reduction",
    "method": "Steinke, Nasr & Jagielski 2023",
    "canary_scores": [],
}


@pytest.fixture(scope="module")
def report():
    ledger = PrivacyLedger([event(device="dev-a", round=1, noise_multiplier=0.8, steps=20)])
    rep = build_report(ledger, {"dev-a": 8.0}, 1e-5, "rdp")
    rep["audit"] = audit_summary(AUDIT)
    return rep


def test_every_rendering_shows_the_bound_beside_the_claim(report):
    lines = audit_lines(report)
    assert lines[0] == "measured lower bound: ε ≥ 0.457 at δ = 1e-05, 95% confidence"
    assert lines[1] == "claimed: ε = 7.997 at δ = 1e-05 (prv accountant)"
    assert "64 canaries (30 inserted), 32 guesses, 25 right" in lines[2]
    assert "at most ε ≥ 2.64" in lines[2]
    md = render_markdown(report)
    assert "## Empirical audit" in md and f"- {lines[0]}" in md
    assert "Audit: measured lower bound: ε ≥ 0.457" in render_table(report)
    assert "<h2>Empirical audit</h2>" in render_html(report)


def test_no_audit_no_section(report):
    plain = {k: v for k, v in report.items() if k != "audit"}
    assert audit_lines(plain) == []
    assert "Empirical audit" not in render_markdown(plain)


def test_read_audit_refuses_a_foreign_or_incomplete_file(tmp_path):
    assert read_audit(tmp_path) is None
    (tmp_path / "audit.json").write_text(json.dumps(AUDIT))
    assert read_audit(tmp_path)["correct"] == 25
    (tmp_path / "audit.json").write_text(json.dumps({**AUDIT, "format": "other"}))
    with pytest.raises(ConfigError, match="not a fedlora audit"):
        read_audit(tmp_path)
    broken = {k: v for k, v in AUDIT.items() if k != "correct"}
    (tmp_path / "audit.json").write_text(json.dumps(broken))
    with pytest.raises(ConfigError, match="fields missing"):
        read_audit(tmp_path)


def test_the_audit_bound_uses_the_delta_of_the_claim_it_checks():
    """A device-only run's claim is the device-level one at privacy.device.delta; a bound
    computed at the record-level δ would sit beside a claim made at another δ."""
    from fedlora.audit.run import audit_delta
    from fedlora.config import FedloraConfig

    base = {"delta": 1e-5, "device": {"delta": 1e-7}}
    record = FedloraConfig().replace(privacy={**base, "unit": "record"})
    both = FedloraConfig().replace(privacy={**base, "unit": "both"})
    device = FedloraConfig().replace(privacy={**base, "unit": "device"})

    assert audit_delta(record) == audit_delta(both) == 1e-5
    assert audit_delta(device) == 1e-7
