"""``fedlora report RUN_DIR``: numbers from the ledger, every format, runs in progress, refusals.

Run directories are written with the privacy API and the config classes (no
simulation): a ledger, ``config.json``, ``run.json`` and ``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.config import FedloraConfig
from fedlora.privacy import DPSGDEvent, PrivacyLedger
from fedlora.privacy.ledger import events_digest

DELTA = 1e-5
PNGS = ("epsilon_by_round.png", "epsilon_distribution.png", "budget_remaining.png")

# (device, round, σ, q, steps): calibrated-looking σ that drift a little, two q values.
EVENTS = [
    ("device-0000", 1, 0.8, 0.1, 20),
    ("device-0001", 1, 1.0, 0.2, 15),
    ("device-0000", 2, 0.79, 0.1, 20),
    ("device-0002", 2, 0.8, 0.1, 20),
    ("device-0001", 3, 0.98, 0.2, 15),
    ("device-0002", 3, 0.8, 0.1, 20),
]


def make_ledger(events=EVENTS, delta=DELTA) -> PrivacyLedger:
    return PrivacyLedger(
        DPSGDEvent(device=d, round=r, noise_multiplier=s, sample_rate=q, steps=n, delta=delta)
        for d, r, s, q, n in events
    )


def make_run(
    path: Path,
    ledger: PrivacyLedger | None,
    *,
    status: str = "complete",
    devices: int = 4,
    rounds: int = 3,
    metrics_rounds: int | None = None,
    partial_metrics_line: bool = False,
    **privacy,
) -> Path:
    """A run directory as ``fedlora simulate`` leaves it, without any training."""
    privacy = {"epsilon": 8.0, "delta": DELTA, **privacy}
    cfg = FedloraConfig().replace(
        privacy=privacy,
        training={"rounds": rounds, "local_steps": 20, "batch_size": 16},
        fleet={
            "num_devices": devices,
            "devices_per_round": devices,
            "min_devices": min(3, devices),
        },
        secagg={"enabled": devices >= 3},
    )
    path.mkdir(parents=True)
    config = {**cfg.to_dict(), "resolved": {"devices": devices}, "versions": {"fedlora": "test"}}
    (path / "config.json").write_text(json.dumps(config))
    (path / "run.json").write_text(json.dumps({"format": "fedlora.run", "status": status}))
    done = rounds if metrics_rounds is None else metrics_rounds
    lines = [json.dumps({"round": r, "eval_loss": 4.0 - r / 10}) for r in range(done + 1)]
    text = "\n".join(lines) + "\n"
    if partial_metrics_line:
        text += '{"round": ' + str(done + 1) + ', "eval_lo'  # a writer caught mid-line
    (path / "metrics.jsonl").write_text(text)
    (path / "privacy").mkdir()
    if ledger is not None:
        ledger.save(path / "privacy" / "ledger.json")
    return path


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["report", *argv])
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fedlora: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    """A finished PRV run (4 devices, one never trained) reported once as JSON."""
    run = make_run(tmp_path_factory.mktemp("report") / "run", make_ledger())
    code, out, err = run_cli(str(run), "--format", "json")
    assert code == 0, err
    return run, json.loads(out), err


# ---------------------------------------------------------------- numbers
def _independent_epsilons(ledger_path: Path) -> dict[str, list[tuple[float, float]]]:
    """(dp_accounting PLD, Opacus PRV) ε after each round of each device, from the raw JSON."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant
    from opacus.accountants import PRVAccountant

    logging.getLogger("absl").setLevel(logging.ERROR)
    events = json.loads(ledger_path.read_text())["events"]
    out: dict[str, list[tuple[float, float]]] = {}
    for device in sorted({e["device"] for e in events}):
        mine = sorted((e for e in events if e["device"] == device), key=lambda e: e["round"])
        pld, prv = PLDAccountant(value_discretization_interval=1e-3), PRVAccountant()
        for e in mine:
            sigma, q, steps = e["noise_multiplier"], e["sample_rate"], e["steps"]
            gaussian = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
            pld.compose(dp_accounting.SelfComposedDpEvent(gaussian, steps))
            for _ in range(steps):
                prv.step(noise_multiplier=sigma, sample_rate=q)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out.setdefault(device, []).append(
                    (float(pld.get_epsilon(DELTA)), float(prv.get_epsilon(DELTA)))
                )
    return out


def test_report_json_matches_an_independent_recomputation_from_the_ledger(complete):
    pytest.importorskip("opacus.accountants")
    run, _, _ = complete
    report = json.loads((run / "privacy" / "report.json").read_text())

    expected = _independent_epsilons(run / "privacy" / "ledger.json")

    assert report["accountant"] == "prv" and report["delta"] == DELTA
    by_device = {d["device"]: d for d in report["devices"]}
    assert set(by_device) == set(expected)
    for device, per_round in expected.items():
        got = [r["epsilon"] for r in by_device[device]["rounds"]]
        assert len(got) == len(per_round)
        for eps, (pld, prv) in zip(got, per_round, strict=True):
            assert eps == pytest.approx(pld, rel=0.01), device
            assert eps == pytest.approx(prv, rel=0.01), device
        assert by_device[device]["epsilon"] == got[-1]
    assert report["fleet"]["max_epsilon"] == max(d["epsilon"] for d in report["devices"])


def test_json_on_stdout_is_report_json(complete):
    run, printed, err = complete

    on_disk = json.loads((run / "privacy" / "report.json").read_text())

    assert printed == on_disk
    assert (printed["format"], printed["version"]) == ("fedlora.privacy.report", 2)
    assert printed["noise"] == "calibrated"
    assert printed["run"] == {
        "status": "complete",
        "in_progress": False,
        "rounds_planned": 3,
        "rounds_completed": 3,
        "secagg": True,
        "unreconciled": None,
        "resumed_at": [],
    }
    # One configured device never trained: counted, not invented.
    assert printed["fleet"]["num_devices"] == 4 and len(printed["devices"]) == 3
    assert "wrote report.json, report.html" in err


def test_files_are_written_next_to_the_ledger(complete):
    run, _, _ = complete

    for name in PNGS:
        data = (run / "privacy" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    html = (run / "privacy" / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("<svg") == 3


@pytest.mark.parametrize("fmt", ["table", "md"])
def test_text_formats_carry_the_numbers(complete, tmp_path, fmt):
    run, report, _ = complete

    code, out, _ = run_cli(str(run), "--format", fmt, "--out", str(tmp_path), "--quiet")

    assert code == 0
    for d in report["devices"]:
        assert d["device"] in out
        for key in ("epsilon", "remaining_epsilon", "epsilon_next_round"):
            assert f"{d[key]:.3f}" in out
    assert f"{report['fleet']['max_epsilon']:.3f}" in out
    assert f"{report['fleet']['median_epsilon']:.3f}" in out
    assert "PRV accountant at δ = 1e-05" in out
    assert "plaintext" in out


def test_html_format_prints_the_page(complete, tmp_path):
    run, _, _ = complete

    code, out, err = run_cli(str(run), "--format", "html", "--out", str(tmp_path), "--quiet")

    assert code == 0 and err == ""
    assert out == (tmp_path / "report.html").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["report.json", "report.html", *PNGS]
    )


# ---------------------------------------------------------------- runs in progress
def test_a_run_in_progress_is_reported_from_its_ledger(tmp_path):
    ledger = make_ledger(EVENTS[:3])  # rounds 1 and 2 so far
    run = make_run(
        tmp_path / "run",
        ledger,
        status="running",
        rounds=10,
        metrics_rounds=2,
        partial_metrics_line=True,
        accountant="rdp",
    )

    code, out, err = run_cli(str(run), "--quiet")

    assert code == 0, err
    assert "run in progress, 2 of 10 rounds" in out
    assert "in progress after round 2 of 10" in out
    report = json.loads((run / "privacy" / "report.json").read_text())
    assert report["run"]["in_progress"] and report["run"]["rounds_completed"] == 2
    assert [r["round"] for r in report["fleet"]["rounds"]] == [1, 2]


def test_a_run_in_progress_without_a_ledger_yet(tmp_path):
    run = make_run(tmp_path / "run", None, status="running")

    code, _, err = run_cli(str(run))

    assert_one_line_error(code, err, "does not exist yet: the run is in progress")


# ---------------------------------------------------------------- exhaustion, δ
def test_fixed_noise_run_reports_devices_that_cannot_afford_another_round(tmp_path):
    events = [("d1", r, 0.8, 0.1, 20) for r in (1, 2)] + [("d2", 1, 0.8, 0.1, 20)]
    run = make_run(
        tmp_path / "run",
        make_ledger(events),
        devices=2,
        accountant="rdp",
        noise_multiplier=0.8,
        epsilon=9.0,  # d1: 2 rounds fit, a third would not; d2: one round, room for another
    )

    code, out, err = run_cli(str(run), "--format", "json", "--quiet")

    assert code == 0, err
    report = json.loads(out)
    d1, d2 = report["devices"]
    assert report["noise"] == "fixed"
    assert d1["epsilon"] < 9.0 < d1["epsilon_next_round"] and d1["exhausted"]
    assert d2["epsilon_next_round"] < 9.0 and not d2["exhausted"]
    assert report["fleet"]["num_exhausted"] == 1


def test_another_delta_goes_to_its_own_directory(complete):
    run, report, _ = complete

    code, out, err = run_cli(str(run), "--delta", "1e-6", "--format", "json")

    assert code == 0, err
    other = json.loads(out)
    assert other["delta"] == 1e-6 and not other["delta_matches_ledger"]
    assert all(
        o["epsilon"] > r["epsilon"]
        for o, r in zip(other["devices"], report["devices"], strict=True)
    )
    assert any("delta=1e-06" in n for n in other["notes"])
    target = run / "privacy" / "delta-1e-06"
    assert json.loads((target / "report.json").read_text()) == other
    assert json.loads((run / "privacy" / "report.json").read_text()) == report  # untouched


# ---------------------------------------------------------------- refusals
def test_missing_run_dir(tmp_path):
    code, out, err = run_cli(str(tmp_path / "nope"))

    assert_one_line_error(code, err, "does not exist")
    assert out == "" and code == 2


def test_missing_ledger_of_a_finished_run(tmp_path):
    run = make_run(tmp_path / "run", None)

    code, _, err = run_cli(str(run))

    assert_one_line_error(code, err, "ledger.json does not exist")
    assert code == 5


def test_a_directory_that_is_not_a_run(tmp_path):
    code, _, err = run_cli(str(tmp_path))

    assert_one_line_error(code, err, "not a fedlora run directory")


def test_a_run_without_dp(tmp_path):
    run = make_run(tmp_path / "run", None, enabled=False)

    code, _, err = run_cli(str(run))

    assert_one_line_error(code, err, "trained without DP")


def _edit_value(data):
    data["events"][0]["noise_multiplier"] = 5.0  # less privacy loss, checksum left as was


def _wrong_type_resigned(data):
    data["events"][0]["steps"] = "20"  # a string, with a checksum that matches it
    data["sha256"] = events_digest(data["events"])


def _int_sigma_resigned(data):
    data["events"][1]["noise_multiplier"] = 1  # an int where a float belongs
    data["sha256"] = events_digest(data["events"])


def _drop_event(data):
    del data["events"][2]


@pytest.mark.parametrize(
    ("tamper", "needle"),
    [
        (_edit_value, "sha256 checksum mismatch"),
        (_drop_event, "sha256 checksum mismatch"),
        (_wrong_type_resigned, "event 0: DPSGDEvent.steps must be an int"),
        (_int_sigma_resigned, "event 1: DPSGDEvent.noise_multiplier must be a finite float"),
    ],
)
def test_a_tampered_ledger_is_refused_not_re_accounted(tmp_path, tamper, needle):
    run = make_run(tmp_path / "run", make_ledger())
    path = run / "privacy" / "ledger.json"
    data = json.loads(path.read_text())
    tamper(data)
    path.write_text(json.dumps(data))

    code, out, err = run_cli(str(run), "--format", "json")

    assert_one_line_error(code, err, needle)
    assert code == 5 and out == ""
    assert sorted(p.name for p in (run / "privacy").iterdir()) == ["ledger.json"]


def test_a_ledger_that_is_not_json(tmp_path):
    run = make_run(tmp_path / "run", make_ledger())
    (run / "privacy" / "ledger.json").write_text('{"events": [')

    code, _, err = run_cli(str(run))

    assert_one_line_error(code, err, "is not valid JSON")


def test_a_ledger_with_more_devices_than_the_fleet(tmp_path):
    run = make_run(tmp_path / "run", make_ledger(), devices=2, accountant="rdp")

    code, _, err = run_cli(str(run))

    assert_one_line_error(code, err, "the ledger is not this run's")


def test_an_unwritable_output_directory(complete, tmp_path):
    run, _, _ = complete
    blocker = tmp_path / "file"
    blocker.write_text("")

    code, _, err = run_cli(str(run), "--out", str(blocker / "sub"), "--quiet")

    assert_one_line_error(code, err, "cannot write the privacy report")


def test_the_report_command_loads_no_training_stack():
    code = (
        "import sys, fedlora.cli, fedlora.cli.report, fedlora.reporting.rundir, "
        "fedlora.reporting.artefacts; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'flwr', 'opacus'}))"
    )

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )

    assert out.stdout.strip() == "[]"


def test_help_lists_the_formats(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--help"])

    assert exit_info.value.code == 0
    assert "table,json,html,md" in capsys.readouterr().out
