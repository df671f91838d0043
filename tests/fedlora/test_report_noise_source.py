"""A run's privacy report says whether its DP noise was reproducible, from its config.json."""

from __future__ import annotations

import json

from fedlora.privacy.report import REPRODUCIBLE_NOISE_WARNING
from fedlora.reporting.artefacts import write_artefacts
from fedlora.reporting.rundir import load_run, report_for
from tests.fedlora.test_report_cli import make_ledger, make_run


def _report(run_dir):
    report = report_for(load_run(run_dir))
    write_artefacts(report, run_dir / "privacy")
    html = (run_dir / "privacy" / "report.html").read_text()
    assert json.loads((run_dir / "privacy" / "report.json").read_text()) == report
    return report, html


def test_a_default_run_says_its_noise_came_from_the_os_csprng(tmp_path):
    report, html = _report(make_run(tmp_path / "run", make_ledger()))

    assert report["noise_source"] == {"source": "os-csprng-chacha20", "reproducible": False}
    assert REPRODUCIBLE_NOISE_WARNING not in report["notes"]
    assert "noise from each device&#x27;s OS CSPRNG (os-csprng-chacha20, not reproducible)" in html


def test_a_reproducible_run_warns_that_epsilon_does_not_hold_against_the_seeds_holders(tmp_path):
    report, html = _report(make_run(tmp_path / "run", make_ledger(), reproducible_noise=True))

    assert report["noise_source"] == {"source": "seeded-chacha20", "reproducible": True}
    assert report["notes"][0] == REPRODUCIBLE_NOISE_WARNING
    assert '<p class="note">This run&#x27;s DP noise was reproducible' in html
    assert "config.json), the coordinator included" in html


def test_a_run_from_before_version_4_is_reported_as_seeded(tmp_path):
    """Its devices seeded their noise from the run's seed: the report must not call it secure."""
    run_dir = make_run(tmp_path / "run", make_ledger())
    config = json.loads((run_dir / "config.json").read_text())
    config["version"] = 3
    del config["privacy"]["reproducible_noise"]
    (run_dir / "config.json").write_text(json.dumps(config))

    report, _ = _report(run_dir)

    assert report["noise_source"]["reproducible"] is True
    assert report["notes"][0] == REPRODUCIBLE_NOISE_WARNING
