"""Write a privacy report's files: ``report.json``, ``report.html`` and the three PNG plots."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedlora.errors import PrivacyError
from fedlora.privacy import write_report
from fedlora.reporting.html import render_html
from fedlora.reporting.plots import PLOTS, to_png
from fedlora.runfiles import write_bytes_atomic

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


def write_artefacts(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write every report file into ``out_dir`` (created if needed); returns their paths.

    Each file is replaced atomically: a reader sees the old one or the new one.
    """
    out = Path(out_dir)
    figures = {name: plot(report) for name, plot in PLOTS.items()}
    written = [out / REPORT_JSON, out / REPORT_HTML]
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_report(report, written[0])
        write_bytes_atomic(render_html(report, figures).encode("utf-8"), written[1])
        for name, fig in figures.items():
            path = out / f"{name}.png"
            write_bytes_atomic(to_png(fig), path)
            written.append(path)
    except OSError as err:
        raise PrivacyError(
            f"cannot write the privacy report into {out}: {err.strerror or err}; "
            "choose another directory with --out"
        ) from None
    return written
