"""Text renderings of a privacy report (:mod:`fedlora.privacy.report`): a plain table, Markdown.

Both show the same figures as the JSON, rounded for reading (ε to 3 decimals),
and always name the accountant and δ. Stdlib only; the HTML page with plots is
built outside ``privacy/`` (``fedlora.reporting``) from :func:`device_table`.
"""

from __future__ import annotations

from typing import Any

DEVICE_COLUMNS: tuple[str, ...] = (
    "device",
    "ε",
    "budget",
    "remaining",
    "rounds",
    "steps",
    "next-round ε",
    "exhausted",
    "accountant",
    "δ",
)
"""Column headers of :func:`device_table`."""

_NUMERIC = frozenset({"ε", "budget", "remaining", "rounds", "steps", "next-round ε", "δ"})


def fmt_epsilon(value: float | None) -> str:
    """ε for reading: three decimals, or an em dash for none."""
    return "—" if value is None else f"{value:.3f}"


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def device_table(report: dict[str, Any]) -> list[list[str]]:
    """One row of strings per device, in :data:`DEVICE_COLUMNS` order."""
    return [
        [
            d["device"],
            fmt_epsilon(d["epsilon"]),
            f"{d['budget_epsilon']:g}",
            fmt_epsilon(d["remaining_epsilon"]),
            str(d["rounds_trained"]),
            str(d["steps"]),
            fmt_epsilon(d["epsilon_next_round"]),
            _yes_no(d["exhausted"]),
            d["accountant"],
            f"{d['delta']:g}",
        ]
        for d in report["devices"]
    ]


def record_level(report: dict[str, Any]) -> bool:
    """Whether the run trained with record-level DP-SGD (every report before device-level
    DP did: they have no ``units``)."""
    return "record" in report.get("units", ("record",))


def headline(report: dict[str, Any]) -> str:
    """The accountant, δ and privacy unit in one sentence."""
    if not record_level(report):
        return "device-level DP only (distributed discrete Gaussian in SecAgg+); no DP-SGD"
    return (
        f"ε by the {report['accountant'].upper()} accountant at δ = {report['delta']:g}; "
        f"privacy unit: {report['privacy_unit']}"
    )


def noise_source_text(report: dict[str, Any]) -> str | None:
    """Where the DP noise came from, in words; None when the report does not say."""
    source = report.get("noise_source")  # absent from reports written before the field
    if source is None:
        return None
    if source["reproducible"]:
        return f"noise seeded from the run's seed ({source['source']}, reproducible: see notes)"
    return f"noise from each device's OS CSPRNG ({source['source']}, not reproducible)"


def run_line(report: dict[str, Any]) -> str:
    """Run status, rounds, noise mode, noise source and SecAgg+ in one line."""
    run = report["run"] or {}
    parts = []
    if run.get("status"):
        status = "in progress" if run["in_progress"] else run["status"]
        done, planned = run.get("rounds_completed"), run.get("rounds_planned")
        if done is not None and planned is not None:
            status += f", {done} of {planned} rounds"
        elif planned is not None:
            status += f", {planned} rounds planned"
        parts.append(f"run {status}")
    parts.append(f"noise multiplier {report['noise']}")
    source = noise_source_text(report)
    if source is not None:
        parts.append(source)
    if run.get("secagg") is not None:
        parts.append("SecAgg+ " + ("on" if run["secagg"] else "off"))
    return " · ".join(parts)


def fleet_lines(report: dict[str, Any]) -> list[str]:
    """The fleet's worst-case and median ε, exhaustion and next-round cost, as sentences."""
    f = report["fleet"]
    lines = [
        f"{f['num_devices']} devices, {f['num_trained']} trained, "
        f"{f['num_exhausted']} exhausted; worst-case ε {fmt_epsilon(f['max_epsilon'])}, "
        f"median ε {fmt_epsilon(f['median_epsilon'])}",
    ]
    nxt = f["next_round"]
    if nxt["max_epsilon"] is not None:
        lines.append(
            "one more round like each device's last: worst-case ε "
            f"{fmt_epsilon(nxt['max_epsilon'])}, ε per round up to "
            f"+{fmt_epsilon(nxt['max_epsilon_increase'])} (median "
            f"+{fmt_epsilon(nxt['median_epsilon_increase'])}); "
            f"{nxt['num_within_budget']} of {f['num_trained']} trained devices stay within budget"
        )
    return lines


def audit_lines(report: dict[str, Any]) -> list[str]:
    """The empirical audit beside the claim (``fedlora audit``), or nothing without one."""
    audit = report.get("audit")
    if not audit:
        return []
    claimed = audit.get("claimed") or {}
    lines = [
        f"measured lower bound: ε ≥ {audit['epsilon_lower_bound']:.3f} at δ = "
        f"{audit['delta']:g}, {audit['confidence']:.0%} confidence",
        f"claimed: ε = {fmt_epsilon(claimed.get('epsilon'))} at δ = {claimed.get('delta', 0):g} "
        f"({claimed.get('accountant', '?')} accountant)",
        f"{audit['canaries']} canaries ({audit['included']} inserted), {audit['guesses']} "
        f"guesses, {audit['correct']} right; these canaries could show at most "
        f"ε ≥ {audit['max_possible']:.2f}",
        f"score: {audit['score']}; method: {audit['method']}",
        "a lower bound, not a guarantee: a bound at or below the claim is what a correct "
        "run shows, one above it refutes the claim",
    ]
    return lines


def device_lines(report: dict[str, Any]) -> list[str]:
    """The device-level section in sentences (nothing when the run had none)."""
    section = report.get("device_level")
    if not section:
        return []
    lines = [
        f"privacy unit: {section['unit']}; ε at δ = {section['delta']:g}, budget "
        f"{section['budget_epsilon']:g}",
        f"{section['num_devices']} devices in unmasked sums; worst-case ε "
        f"{section['max_epsilon']:.3f}, median ε {section['median_epsilon']:.3f}",
    ]
    if section["rounds"]:
        survivors = ", ".join(f"r{r['round']}: {r['survivors']}" for r in section["rounds"])
        lines.append(f"devices whose noise each unmasked sum held: {survivors}")
    m = section.get("mechanism")
    if m:
        lines.append(
            f"mechanism: distributed discrete Gaussian, {m['bits']}-bit SecAgg+ sum, whole "
            f"update clipped to L2 {m['clip_norm']:g}, σ = {m['noise_stddev']:.4g} per "
            f"device on a grid of {m['scale']:.4g} steps per clip norm, noise sized for "
            f"{m['min_survivors']} survivors and {m['participations']} rounds per device, "
            f"wrap-around ≤ {m['wrap_probability']:g} per round"
        )
    lines.append(f"accountant: {section['accountant']}")
    return lines


def round_table(report: dict[str, Any]) -> list[list[str]]:
    """Per federated round: devices trained, and the fleet's worst-case and median ε after it."""
    return [
        [
            str(r["round"]),
            str(r["devices_trained"]),
            fmt_epsilon(r["max_epsilon"]),
            fmt_epsilon(r["median_epsilon"]),
        ]
        for r in report["fleet"]["rounds"]
    ]


ROUND_COLUMNS: tuple[str, ...] = ("round", "devices trained", "worst-case ε", "median ε")


def _text_table(headers: tuple[str, ...], rows: list[list[str]], numeric: frozenset[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        out = [
            c.rjust(w) if h in numeric else c.ljust(w)
            for c, w, h in zip(cells, widths, headers, strict=True)
        ]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def render_table(report: dict[str, Any]) -> str:
    """The report as plain text for a terminal."""
    parts = ["Privacy report", headline(report), run_line(report)]
    if record_level(report):
        parts += [
            "",
            "Fleet: " + "\n       ".join(fleet_lines(report)),
            f"Exhausted means: {report['exhaustion_rule']}.",
        ]
    if report.get("device_level"):
        parts += ["", "Device-level: " + "\n              ".join(device_lines(report))]
    if report.get("audit"):
        parts += ["", "Audit: " + "\n       ".join(audit_lines(report))]
    if record_level(report) and report["fleet"]["rounds"]:
        rounds_numeric = frozenset(ROUND_COLUMNS)
        parts += ["", _text_table(ROUND_COLUMNS, round_table(report), rounds_numeric)]
    if record_level(report) and report["devices"]:
        parts += ["", _text_table(DEVICE_COLUMNS, device_table(report), _NUMERIC)]
    if report["notes"]:
        parts += ["", "Notes:", *(f"- {n}" for n in report["notes"])]
    parts += ["", "What ε means here:", *(f"- {a}" for a in report["assumptions"])]
    return "\n".join(parts) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(headers: tuple[str, ...], rows: list[list[str]], numeric: frozenset[str]) -> str:
    align = ["---:" if h in numeric else "---" for h in headers]
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join(align) + " |",
        *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows),
    ]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (GitHub tables)."""
    parts = [
        "# Privacy report",
        "",
        headline(report) + ".",
        "",
        run_line(report) + ".",
        "",
    ]
    if record_level(report):
        parts += [
            "## Fleet",
            "",
            *(f"- {line}" for line in fleet_lines(report)),
            f"- exhausted means: {report['exhaustion_rule']}",
        ]
    if report.get("device_level"):
        parts += ["", "## Device-level privacy", "", *(f"- {x}" for x in device_lines(report))]
    if report.get("audit"):
        parts += ["", "## Empirical audit", "", *(f"- {line}" for line in audit_lines(report))]
    if record_level(report) and report["fleet"]["rounds"]:
        parts += [
            "",
            "## ε by round",
            "",
            _md_table(ROUND_COLUMNS, round_table(report), frozenset(ROUND_COLUMNS)),
        ]
    if record_level(report) and report["devices"]:
        parts += ["", "## Devices", "", _md_table(DEVICE_COLUMNS, device_table(report), _NUMERIC)]
    if report["notes"]:
        parts += ["", "## Notes", "", *(f"- {n}" for n in report["notes"])]
    parts += ["", "## What ε means here", "", *(f"- {a}" for a in report["assumptions"])]
    return "\n".join(parts) + "\n"
