"""bench/report.py: the README table between its markers, rows from result JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import report


def _readme(tmp_path: Path) -> Path:
    path = tmp_path / "README.md"
    path.write_text(f"# x\n\n## Benchmarks\n\n{report.BEGIN}\nold\n{report.END}\n\n## Next\n")
    return path


def _scale(figure: float, meets: bool) -> dict:
    size = {"peak_rss_mib": 1000.0, "round_s": 10.0, "startup_s": 20.0}
    return {
        "bench": "fleet_scale",
        "figure": figure,
        "target": 1.2,
        "meets_target": meets,
        "sizes": {"100": size, "1000": {**size, "peak_rss_mib": 1100.0}},
        "machine": {"cpus": 2, "loadavg_at_end": [3.0, 2.0, 1.0]},
        "suite": {"date": "2026-11-28", "mode": "quick"},
    }


def test_splice_replaces_only_between_markers(tmp_path: Path) -> None:
    text = _readme(tmp_path).read_text()
    out = report.splice(text, "| new |")
    assert "old" not in out
    assert out.startswith("# x\n\n## Benchmarks\n\n")
    assert out.endswith(f"| new |\n{report.END}\n\n## Next\n")


def test_splice_refuses_a_readme_without_markers() -> None:
    with pytest.raises(ValueError, match="bench-table"):
        report.splice("# no markers\n", "| t |")


def test_rows_say_figure_target_verdict_and_run(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "fleet_scale.json").write_text(json.dumps(_scale(1.1, True)))
    readme = _readme(tmp_path)
    assert report.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    row = next(line for line in text.splitlines() if "fleet_scale.py" in line)
    assert "**1.10** (target ≤ 1.20: met)" in row
    assert "1000: 1100 MiB peak RSS" in row
    assert "2026-11-28, quick, 2 cores, load 3.0" in row
    assert report.main(["--results", str(results), "--readme", str(readme), "--check"]) == 0


def test_missed_target_and_unsummarizable_result() -> None:
    assert "missed" in report.figure_cell(_scale(1.5, False))
    broken = {"bench": "fleet_scale", "figure": 1.0, "sizes": {"100": {"round_s": 1.0}}}
    assert "cannot summarize" in report.row("fleet_scale", broken)
