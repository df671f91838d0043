"""The privacy report as one self-contained HTML page: no server, no network, no scripts.

The plots are inline SVG (``fedlora.reporting.plots``), the style sheet is
inline, and the report's JSON rides along in a ``<script type="application/json">``
data block (never executed) so the page carries the same numbers as ``report.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from html import escape
from typing import Any

from matplotlib.figure import Figure

from fedlora.privacy.render import (
    DEVICE_COLUMNS,
    ROUND_COLUMNS,
    audit_lines,
    device_lines,
    device_table,
    fleet_lines,
    headline,
    record_level,
    round_table,
    run_line,
)
from fedlora.reporting.plots import PLOTS, to_svg

CAPTIONS = {
    "epsilon_by_round": (
        "Each device's ε after every federated round (flat while it is not sampled); the bold "
        "line is the fleet's worst case, the dotted line its median, the dashed line the budget."
    ),
    "epsilon_distribution": (
        "How ε is spread across the fleet; devices that never trained count as ε = 0."
    ),
    "budget_remaining": (
        "Budget left per device (red: exhausted) and, as a cross, what one more round like its "
        "last one would leave."
    ),
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #1f1f1f; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
.sub { color: #555; margin-top: 0; }
.note { background: #fff6d6; border-left: 4px solid #e0a800; padding: 0.5rem 0.8rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { border-bottom: 1px solid #e4e4e4; padding: 0.25rem 0.6rem; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.exhausted td { color: #c0392b; font-weight: 600; }
figure { margin: 1rem 0; } figure svg { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.85rem; }
code { background: #f3f3f3; padding: 0 0.2rem; }
"""

_NUMERIC = {"ε", "budget", "remaining", "rounds", "steps", "next-round ε", "δ"}


def _table(
    table_id: str,
    headers: tuple[str, ...],
    rows: list[list[str]],
    numeric: set[str] | frozenset[str],
    row_classes: list[str] | None = None,
) -> str:
    head = "".join(
        f'<th class="num">{escape(h)}</th>' if h in numeric else f"<th>{escape(h)}</th>"
        for h in headers
    )
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(
            f'<td class="num">{escape(c)}</td>' if h in numeric else f"<td>{escape(c)}</td>"
            for c, h in zip(row, headers, strict=True)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return (
        f'<table id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _figure(name: str, report: dict[str, Any], figures: Mapping[str, Figure]) -> str:
    fig = figures[name] if name in figures else PLOTS[name](report)
    svg = to_svg(fig, name)
    return (
        f'<figure id="plot-{name}" class="plot">{svg}'
        f"<figcaption>{escape(CAPTIONS[name])}</figcaption></figure>"
    )


def _data_block(report: dict[str, Any]) -> str:
    # "</" would end the script element early; JSON allows the escaped form.
    text = json.dumps(report, sort_keys=True, allow_nan=False).replace("</", "<\\/")
    return f'<script type="application/json" id="report-data">{text}</script>'


def _section(title: str, lines: list[str]) -> str:
    """A heading and a list, or nothing without lines."""
    if not lines:
        return ""
    items = "".join(f"<li>{escape(line)}</li>" for line in lines)
    return f"<h2>{escape(title)}</h2><ul>{items}</ul>"


def _audit(report: dict[str, Any]) -> str:
    return _section("Empirical audit", audit_lines(report))


def _device_level(report: dict[str, Any]) -> str:
    return _section("Device-level privacy", device_lines(report))


def render_html(
    report: dict[str, Any],
    figures: Mapping[str, Figure] | None = None,
    title: str = "fedlora privacy report",
) -> str:
    """The report as a complete HTML document (UTF-8).

    ``figures`` may hold plots already drawn (by name, see ``PLOTS``); the rest are drawn here.
    """
    figures = figures or {}
    notes = "".join(f'<p class="note">{escape(n)}</p>' for n in report["notes"])
    fleet = "".join(f"<li>{escape(line)}</li>" for line in fleet_lines(report))
    rows = device_table(report)
    classes = ["exhausted" if d["exhausted"] else "" for d in report["devices"]]
    record_parts = [
        "<h2>Fleet</h2>",
        f"<ul>{fleet}<li>exhausted means: {escape(report['exhaustion_rule'])}</li></ul>",
        _device_level(report),
        _audit(report),
        _figure("epsilon_by_round", report, figures),
        _figure("epsilon_distribution", report, figures),
        _figure("budget_remaining", report, figures),
        "<h2>ε by round</h2>",
        _table("rounds", ROUND_COLUMNS, round_table(report), set(ROUND_COLUMNS)),
        "<h2>Devices</h2>",
        _table("devices", DEVICE_COLUMNS, rows, _NUMERIC, classes),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="sub">{escape(headline(report))}.<br>{escape(run_line(report))}.</p>',
        notes,
        *(record_parts if record_level(report) else [_device_level(report)]),
        "<h2>What ε means here</h2>",
        "<ul>" + "".join(f"<li>{escape(a)}</li>" for a in report["assumptions"]) + "</ul>",
        "<h2>Data</h2>",
        f"<p>The same numbers as JSON: <code>report.json</code> (format "
        f"<code>{escape(report['format'])}</code>, version {report['version']}; every field "
        "is described in <code>privacy/REPORT_SCHEMA.md</code>), also embedded in this page "
        'as <code>&lt;script id="report-data"&gt;</code>.</p>',
        _data_block(report),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"
