"""The privacy report's three plots, drawn with matplotlib's object API.

Figures are built without pyplot, so no GUI backend or display is ever touched
and the process's backend is left alone; PNGs render through Agg.

* :func:`epsilon_by_round`: each device's cumulative ε after every federated
  round, the fleet's worst case, and the budget;
* :func:`epsilon_distribution`: how ε is spread across the fleet;
* :func:`budget_remaining`: each device's budget left, and what one more round
  like its last one would leave.

Each takes a report dict (``fedlora.privacy.report``) and returns a Figure; :func:`to_png`
and :func:`to_svg` serialise it. Axes always name the accountant and δ.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib
from matplotlib.figure import Figure

EXHAUSTED = "#c0392b"
OK = "#2e8b57"
BUDGET = "#555555"
WORST = "#1f1f1f"
MANY_DEVICES = 40
"""Above this many devices the plots drop per-device labels and legends."""


def _eps_label(report: dict[str, Any]) -> str:
    return f"ε ({report['accountant'].upper()}, δ = {report['delta']:g})"


def _budgets(report: dict[str, Any]) -> list[float]:
    return sorted({d["budget_epsilon"] for d in report["devices"]})


def _all_epsilons(report: dict[str, Any]) -> list[float]:
    """Every fleet device's ε, including never-trained devices known only by count."""
    eps = [d["epsilon"] for d in report["devices"]]
    return eps + [0.0] * (report["fleet"]["num_devices"] - len(eps))


def _draw_budgets(ax: Any, report: dict[str, Any], horizontal: bool) -> None:
    for i, budget in enumerate(_budgets(report)):
        label = "budget" if i == 0 else None
        if horizontal:
            ax.axhline(budget, color=BUDGET, linestyle="--", linewidth=1.2, label=label)
        else:
            ax.axvline(budget, color=BUDGET, linestyle="--", linewidth=1.2, label=label)


def epsilon_by_round(report: dict[str, Any]) -> Figure:
    """Cumulative ε of every device after each round (steps: flat while it is not sampled)."""
    fig = Figure(figsize=(8.0, 4.8), layout="constrained")
    ax = fig.add_subplot()
    rounds = report["fleet"]["rounds"]
    run = report["run"] or {}
    # Lines run to the last round that happened; the axis to the last one planned.
    last = max([r["round"] for r in rounds] + [run.get("rounds_completed") or 0, 1])
    axis_end = max(last, run.get("rounds_planned") or 0)
    devices = report["devices"]
    many = len(devices) > MANY_DEVICES
    cmap = matplotlib.colormaps["viridis"]
    for i, d in enumerate(devices):
        xs = [0] + [r["round"] for r in d["rounds"]]
        ys = [0.0] + [r["epsilon"] for r in d["rounds"]]
        if xs[-1] < last:
            xs.append(last)
            ys.append(ys[-1])
        color = EXHAUSTED if d["exhausted"] else cmap(i / max(1, len(devices) - 1))
        ax.step(
            xs,
            ys,
            where="post",
            color=color,
            linewidth=0.8 if many else 1.3,
            alpha=0.35 if many else 0.9,
            marker=None if many else "o",
            markersize=3,
            label=None if many else d["device"],
            rasterized=len(devices) > 200,
        )
    if rounds:
        xs = [0] + [r["round"] for r in rounds]
        ax.step(
            xs,
            [0.0] + [r["max_epsilon"] for r in rounds],
            where="post",
            color=WORST,
            linewidth=2.4,
            label="fleet worst case",
        )
        ax.step(
            xs,
            [0.0] + [r["median_epsilon"] for r in rounds],
            where="post",
            color=WORST,
            linewidth=1.6,
            linestyle=":",
            label="fleet median",
        )
    _draw_budgets(ax, report, horizontal=True)
    ax.set_xlim(0, axis_end)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("federated round")
    ax.set_ylabel(_eps_label(report))
    ax.set_title("ε after each round, per device")
    ax.grid(alpha=0.3)
    ax.legend(
        fontsize=7 if not many else 8,
        ncol=1 if many else 2,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
    )
    return fig


def epsilon_distribution(report: dict[str, Any]) -> Figure:
    """Histogram of the fleet's ε, with the budget, the median and the worst case marked."""
    fig = Figure(figsize=(8.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    eps = _all_epsilons(report)
    top = max([*eps, *_budgets(report), 1e-3]) * 1.05
    ax.hist(eps, bins=min(40, max(10, len(eps) // 3)), range=(0.0, top), color="#4c72b0")
    ax.plot(eps, [0.0] * len(eps), "|", color=WORST, markersize=12, alpha=0.6)
    _draw_budgets(ax, report, horizontal=False)
    fleet = report["fleet"]
    ax.axvline(fleet["median_epsilon"], color=OK, linewidth=1.5, label="median")
    ax.axvline(fleet["max_epsilon"], color=EXHAUSTED, linewidth=1.5, label="worst case")
    ax.set_xlim(0, top)
    ax.set_xlabel(_eps_label(report))
    ax.set_ylabel("devices")
    ax.set_title(f"ε across the fleet ({fleet['num_devices']} devices)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return fig


def budget_remaining(report: dict[str, Any]) -> Figure:
    """Budget left per device (sorted), and what one more round like its last would leave."""
    devices = sorted(report["devices"], key=lambda d: d["remaining_epsilon"])
    many = len(devices) > MANY_DEVICES
    height = 4.0 if many else max(3.0, 0.25 * len(devices) + 1.2)
    fig = Figure(figsize=(8.0, height), layout="constrained")
    ax = fig.add_subplot()
    remaining = [d["remaining_epsilon"] for d in devices]
    after_next = [
        d["budget_epsilon"] - d["epsilon_next_round"]
        if d["epsilon_next_round"] is not None
        else None
        for d in devices
    ]
    colors = [EXHAUSTED if d["exhausted"] else OK for d in devices]
    pos = list(range(len(devices)))
    nxt = [(p, a) for p, a in zip(pos, after_next, strict=True) if a is not None]
    if many:
        ax.bar(pos, remaining, width=1.0, color=colors, label="remaining ε")
        if nxt:
            ax.plot(
                [p for p, _ in nxt],
                [a for _, a in nxt],
                ".",
                color=WORST,
                markersize=2,
                label="after one more round",
            )
        ax.axhline(0.0, color=BUDGET, linewidth=1)
        ax.set_xlabel("devices, sorted by remaining budget")
        ax.set_ylabel(f"remaining {_eps_label(report)}")
        ax.set_xticks([])
    else:
        ax.barh(pos, remaining, color=colors, label="remaining ε")
        if nxt:
            ax.plot(
                [a for _, a in nxt],
                [p for p, _ in nxt],
                "kx",
                markersize=5,
                label="after one more round like its last",
            )
        ax.axvline(0.0, color=BUDGET, linewidth=1)
        ax.set_yticks(pos, [d["device"] for d in devices], fontsize=7)
        ax.set_xlabel(f"remaining {_eps_label(report)}")
    ax.set_title(f"budget remaining ({report['fleet']['num_exhausted']} exhausted, shown in red)")
    ax.grid(alpha=0.3)
    if devices:
        ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    return fig


PLOTS = {
    "epsilon_by_round": epsilon_by_round,
    "epsilon_distribution": epsilon_distribution,
    "budget_remaining": budget_remaining,
}
"""Name (the PNG's file stem and the HTML figure's id) → plot function."""


def to_png(fig: Figure, dpi: int = 120) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def to_svg(fig: Figure, name: str) -> str:
    """The figure as an ``<svg>`` element for inlining (no XML prolog, text kept as text).

    ``name`` salts the ids matplotlib generates, so several inlined figures never share one.
    """
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]
