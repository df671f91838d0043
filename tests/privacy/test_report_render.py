"""Plain-text and Markdown renderings carry the report's numbers, accountant, δ and caveats."""

import re
import subprocess
import sys

import pytest

from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.render import (
    DEVICE_COLUMNS,
    device_table,
    render_markdown,
    render_table,
    run_line,
)
from fedlora.privacy.report import RunInfo, build_report
from tests.privacy._helpers import event

DELTA = 1e-5


@pytest.fixture(scope="module")
def report():
    ledger = PrivacyLedger(
        [
            event(device="dev-a", round=1, noise_multiplier=0.8, steps=20),
            event(device="dev-a", round=2, noise_multiplier=0.8, steps=20),
            event(device="dev|b", round=2, noise_multiplier=1.0, sample_rate=0.2, steps=15),
        ]
    )
    run = RunInfo(status="running", rounds_planned=5, rounds_completed=2, secagg=True)
    return build_report(ledger, {"dev-a": 6.0, "dev|b": 8.0}, DELTA, "rdp", fleet_size=3, run=run)


def _numbers(report):
    """Every figure a reader needs, as the renderings print them."""
    out = []
    for d in report["devices"]:
        out += [f"{d['epsilon']:.3f}", f"{d['remaining_epsilon']:.3f}"]
        out += [f"{d['epsilon_next_round']:.3f}", f"{d['budget_epsilon']:g}"]
    fleet = report["fleet"]
    out += [f"{fleet['max_epsilon']:.3f}", f"{fleet['median_epsilon']:.3f}"]
    out += [f"{r['max_epsilon']:.3f}" for r in fleet["rounds"]]
    return out


def test_device_table_rows(report):
    rows = device_table(report)

    assert len(rows) == 2 and all(len(r) == len(DEVICE_COLUMNS) for r in rows)
    a = report["devices"][0]
    assert rows[0][:7] == [
        "dev-a",
        f"{a['epsilon']:.3f}",
        "6",
        f"{a['remaining_epsilon']:.3f}",
        "2",
        "40",
        f"{a['epsilon_next_round']:.3f}",
    ]
    assert rows[0][8:] == ["rdp", "1e-05"]


@pytest.mark.parametrize("render", [render_table, render_markdown])
def test_renderings_carry_the_numbers_and_the_caveats(report, render):
    text = render(report)

    for number in _numbers(report):
        assert number in text
    assert "RDP accountant at δ = 1e-05" in text
    assert "one training sequence (record) of one device" in text
    assert "in progress after round 2 of 5" in text
    assert "plaintext" in text and "Poisson" in text and "SecAgg+" in text
    assert f"{report['fleet']['num_exhausted']} exhausted" in text


def test_markdown_tables_are_well_formed(report):
    text = render_markdown(report)
    device_rows = [ln for ln in text.splitlines() if ln.startswith(("| dev-", "| dev\\|"))]

    assert len(device_rows) == 2
    assert "dev\\|b" in device_rows[1]  # a pipe in an id does not break the table
    cells = {len(re.split(r"(?<!\\)\|", ln)) - 2 for ln in device_rows}  # unescaped pipes
    assert cells == {len(DEVICE_COLUMNS)}


def test_table_lines_up(report):
    lines = render_table(report).splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("device "))

    assert lines[header + 1].startswith("------")
    assert len({len(ln) for ln in lines[header + 1 : header + 4]}) == 1  # same width rows


def test_report_and_render_import_only_numpy_scipy_and_stdlib():
    code = (
        "import sys, privacy.report, privacy.render; "
        "heavy = {'torch', 'flwr', 'opacus', 'rich', 'matplotlib'}; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))"
    )

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )

    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("render", [render_table, render_markdown])
@pytest.mark.parametrize("reproducible", [False, True])
def test_renderings_say_where_the_noise_came_from(render, reproducible):
    ledger = PrivacyLedger([event(device="dev-a", round=1, noise_multiplier=0.8, steps=20)])
    run = RunInfo(status="complete", secagg=True, reproducible_noise=reproducible)
    report = build_report(ledger, {"dev-a": 6.0}, DELTA, "rdp", run=run)

    text = render(report)

    if reproducible:
        assert "noise seeded from the run's seed (seeded-chacha20, reproducible" in text
        assert "does not hold against them" in text and "config.json" in text
    else:
        assert "noise from each device's OS CSPRNG (os-csprng-chacha20, not reproducible)" in text
        assert "does not hold against them" not in text


def test_a_report_without_the_field_renders_as_before(report):
    """Reports written before noise_source existed (and ones that do not state it)."""
    old = {k: v for k, v in report.items() if k != "noise_source"}

    assert (
        run_line(old)
        == run_line(report)
        == ("run in progress, 2 of 5 rounds · noise multiplier None · SecAgg+ on")
    )
    assert render_table(old) == render_table(report)
