"""The HTML privacy report: one self-contained page, rendered by headless Chromium.

Chromium comes from the system (``scripts/install.sh dev`` installs the Debian
package where apt-get is available); the rendering tests skip, saying why, only
when no Chromium binary is found.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fedlora.test_report_cli import make_ledger, make_run, run_cli

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    run = make_run(tmp_path_factory.mktemp("html") / "run", make_ledger(), accountant="rdp")
    code, _, err = run_cli(str(run), "--quiet")
    assert code == 0, err
    return run / "privacy" / "report.html"


@pytest.fixture(scope="module")
def report(page) -> dict:
    return json.loads((page.parent / "report.json").read_text())


def test_page_is_self_contained(page):
    html = page.read_text()

    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    assert "url(http" not in html and "@import" not in html and "<link" not in html
    scripts = re.findall(r"<script[^>]*>", html)
    assert scripts == ['<script type="application/json" id="report-data">']  # data, never run
    assert html.count("<svg") == 3


def test_page_embeds_the_same_numbers_as_report_json(page, report):
    html = page.read_text()
    block = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html)

    assert block is not None
    assert json.loads(block.group(1)) == report
    for d in report["devices"]:
        assert f"<td>{d['device']}</td>" in html
        assert f'<td class="num">{d["epsilon"]:.3f}</td>' in html


def _chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(
        "no Chromium binary on PATH (tried: " + ", ".join(BROWSERS) + "); "
        "install it with `apt-get install chromium` or `scripts/install.sh dev`"
    )


def _run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "profile"
    return subprocess.run(
        [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(tmp_path)},
        check=False,
    )


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_chromium_screenshot_shows_the_page(page, tmp_path):
    from matplotlib.image import imread

    shot = tmp_path / "shot.png"

    proc = _run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri())

    assert proc.returncode == 0, proc.stderr[-2000:]
    data = shot.read_bytes()
    assert _png_size(data) == (1200, 2000)
    assert len(data) > 50_000  # a blank page compresses to a few kB
    pixels = imread(shot)[..., :3]
    ink = (pixels.mean(axis=2) < 0.9).mean()  # share of non-white pixels
    assert ink > 0.02, ink
    assert len({tuple(p) for p in pixels[::20, ::20].reshape(-1, 3)}) > 20  # plots have colours


def test_chromium_dom_has_the_plots_and_the_table(page, report, tmp_path):
    proc = _run_chromium(tmp_path, "--dump-dom", page.as_uri())

    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    for name in ("epsilon_by_round", "epsilon_distribution", "budget_remaining"):
        figure = re.search(rf'<figure id="plot-{name}" class="plot">(.*?)</figure>', dom, re.S)
        assert figure is not None and "<svg" in figure.group(1), name
    table = re.search(r'<table id="devices">.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert table is not None
    assert table.group(1).count("<tr") == len(report["devices"]) == 3
    rounds = re.search(r'<table id="rounds">.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert rounds is not None and rounds.group(1).count("<tr") == 3
    assert "What ε means here" in dom and "plaintext" in dom
