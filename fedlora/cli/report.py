"""``fedlora report RUN_DIR``: the privacy report of a run, finished or in progress.

Reads ``RUN_DIR/privacy/ledger.json`` (refusing an edited or mistyped one) and
``config.json``, recomputes every device's ε round by round with the run's
accountant, prints the report (table, Markdown, JSON or HTML) and writes
``report.json``, ``report.html`` and three PNG plots next to the ledger.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from fedlora.argtypes import open_unit_interval, positive_int

FORMATS = ("table", "json", "html", "md")

EPILOG = """\
examples:
  fedlora report runs/demo                     # table; writes runs/demo/privacy/report.{json,html}
  fedlora report runs/demo --format md > privacy.md
  fedlora report runs/demo --delta 1e-6        # ε at another δ, files under privacy/delta-1e-06/
"""


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``report`` subcommand's arguments (``fedlora.cli`` builds the subparser)."""
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a fedlora run directory")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="table",
        help="what to print on stdout (default: table); the files are written either way",
    )
    parser.add_argument(
        "--delta",
        type=open_unit_interval,
        metavar="D",
        help="report ε at this δ instead of the run's (budgets stay those set for the run's δ)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where to write report.json, report.html and the PNG plots (default: "
        "RUN_DIR/privacy, or RUN_DIR/privacy/delta-D with --delta D other than the run's)",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=min(8, os.cpu_count() or 1),
        metavar="N",
        help="processes for large fleets (default: CPUs, at most 8)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress and no 'wrote' line")
    parser.add_argument("--verbose", action="store_true", help="tracebacks on errors")


class _Progress:
    """A rich progress bar on stderr, shown only for long computations on a terminal."""

    MIN_TOTAL = 50

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._bar: Any = None
        self._task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total < self.MIN_TOTAL:
            return
        if self._bar is None:
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task("ε per device and round", total=total)
        self._bar.update(self._task, completed=done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def render(report: dict[str, Any], fmt: str) -> str:
    """The report in one of :data:`FORMATS`."""
    if fmt == "json":
        import json

        return json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n"
    if fmt == "html":
        from fedlora.reporting.html import render_html

        return render_html(report)
    from fedlora.privacy.render import render_markdown, render_table

    return render_markdown(report) if fmt == "md" else render_table(report)


def cmd_report(args: argparse.Namespace) -> int:
    from fedlora.reporting.artefacts import write_artefacts
    from fedlora.reporting.rundir import load_run, report_for

    run = load_run(args.run_dir)
    run_delta = run.config.privacy.delta
    out_dir = args.out
    if out_dir is None:
        out_dir = args.run_dir / "privacy"
        if args.delta is not None and args.delta != run_delta:
            out_dir = out_dir / f"delta-{args.delta:g}"
    progress = _Progress(enabled=not args.quiet)
    try:
        report = report_for(run, args.delta, workers=args.workers, progress=progress)
    finally:
        progress.close()
    written = write_artefacts(report, out_dir)
    if args.format == "html":  # already rendered with its plots: print that file
        sys.stdout.write((out_dir / "report.html").read_text(encoding="utf-8"))
    else:
        sys.stdout.write(render(report, args.format))
    sys.stdout.flush()
    if not args.quiet:
        names = ", ".join(p.name for p in written)
        print(f"fedlora: wrote {names} to {out_dir}", file=sys.stderr)
    return 0
