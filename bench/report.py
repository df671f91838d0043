"""Render ``bench/results/*.json`` as the README's benchmark table.

The table lives between two marker comments in README.md's Benchmarks section
(:data:`BEGIN`, :data:`END`); only what lies between them is replaced. One row
per bench: what it measures, the headline figure against its target, and the
numbers behind it, each from that bench's JSON (mode quick/full, date and load
from its ``suite`` and ``machine`` entries).

    .venv/bin/python bench/report.py [--results bench/results] [--readme README.md] [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
BEGIN = "<!-- bench-table:begin (bench/report.py writes this table from bench/results) -->"
END = "<!-- bench-table:end -->"
ORDER = (
    "dp_overhead",
    "secagg_overhead",
    "efficiency",
    "fleet_scale",
    "utility",
    "export_formats",
    "audit",
    "distributed_dp",
)
WHAT = {
    "dp_overhead": "`bench/dp_overhead.py` — CPU s per optimizer step, DP-SGD ÷ plain SGD, "
    "same LoRA model, batch, seq_len 64, 1 thread (default model, batch 16)",
    "secagg_overhead": "`bench/secagg_overhead.py` — simulated round wall time, SecAgg+ ÷ "
    "plain, all devices sampled, DP-SGD local training",
    "efficiency": "`bench/efficiency.py` — simulated rounds' wall time ÷ ideal (summed "
    "local-training s ÷ worker slots)",
    "fleet_scale": "`bench/fleet_scale.py` — peak RSS of the run's process tree (driver + Ray "
    "+ workers) at 1,000 ÷ 100 devices, the same number sampled per round",
    "utility": "`bench/utility.py` — tinyshakespeare roles on the embedded base (never saw "
    "the play): share of the centralized non-DP loss reduction recovered by federated "
    "DP FFA-LoRA (ε = 8)",
    "export_formats": "`bench/export_formats.py RUN_DIR` — each on-device format's size and "
    "quality against the merged fp32 model",
    "distributed_dp": "`bench/distributed_dp.py` — device-level DP at ε = 8, δ = 1e-5, 100 "
    "devices, 10 per round: uplink bytes per adapter value at b = 16; held-out loss of the "
    "distributed discrete Gaussian at b = 16/20/32 against a trusted coordinator's Gaussian",
    "audit": "`bench/audit.py` — empirical privacy audit (one run, canaries, 95%): ε lower "
    "bound ÷ claimed ε at ε = 8, default fleet (≤ 1 is soundness, not power: the noiseless "
    "variant's bound says whether the audit can see anything at this size)",
}


def _n(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _mib(b: float) -> str:
    return f"{b / 2**10:.0f} KiB" if b < 2**20 else f"{b / 2**20:.1f} MiB"


def details_dp(r: dict[str, Any]) -> str:
    sizes = r.get("sizes", {})
    parts = [
        f"{k.replace('default_', '')}: {v.get('ratio_cpu', v['ratio']):.2f}"
        for k, v in sizes.items()
    ]
    if "figure_wall" in r:
        parts.insert(0, f"wall-clock {r['figure_wall']:.2f}")
    b = r.get("breakdown_default_b16", {})
    extra = ""
    if b:
        extra = (
            f"; backward with per-sample grads {b['dp_backward_per_sample_grads'] * 1e3:.1f} ms "
            f"vs {b['nondp_backward'] * 1e3:.1f} ms"
        )
    return ", ".join(parts) + extra


def details_secagg(r: dict[str, Any]) -> str:
    parts = []
    for n, s in r.get("sizes", {}).items():
        sec, plain = s["variants"]["secagg"], s["variants"]["plain"]
        up = sec["uplink_per_device"]
        est = up.get("payload_from_flower_primitives", {}).get("bytes")
        fp32 = r.get("fp32_adapter_bytes")
        payload = (
            f"; Flower 1.39's SecAgg+ payload {_mib(est)} = {est / fp32:.2f}× fp32"
            if est and fp32
            else ""
        )
        parts.append(
            f"{n} devices: {s['time_ratio']:.2f}× ({sec['round_s']:.1f} s vs "
            f"{plain['round_s']:.1f} s), uplink {_mib(up['bytes'])} = {up['vs_fp32']:.2f}× fp32 "
            f"(plain {plain['uplink_per_device']['vs_fp32']:.2f}×){payload}"
        )
    source = {s["variants"]["secagg"]["uplink_per_device"]["source"] for s in r["sizes"].values()}
    head = ""
    if r.get("uplink_figure") is not None:
        met = "met" if r.get("meets_uplink_target") else "missed"
        head = (
            f"uplink ÷ fp32 adapter **{r['uplink_figure']:.3f}** "
            f"(target ≤ {r.get('uplink_target', 1.05):.2f}: {met}); "
        )
    return head + "; ".join(parts) + f" [bytes: {', '.join(sorted(source))}]"


def details_efficiency(r: dict[str, Any]) -> str:
    return (
        f"{r.get('devices', '?')} devices, {r.get('per_round', '?')}/round, "
        f"{r.get('rounds', '?')} round(s): "
        f"{r['rounds_wall_s']:.1f} s of rounds vs ideal {r['ideal_s']:.1f} s "
        f"({r['training_compute_s']:.1f} s training ÷ {r['slots']} slots, "
        f"{r['compute_source']}); whole run {r['whole_run_wall_s']:.0f} s = "
        f"{r['whole_run_ratio']:.2f}× ideal"
    )


def details_scale(r: dict[str, Any]) -> str:
    parts = [f"{r.get('per_round', '?')}/round, {r.get('rounds', '?')} round(s)"]
    for n, s in r.get("sizes", {}).items():
        parts.append(
            f"{n}: {s['peak_rss_mib']:.0f} MiB peak RSS, {_n(s['round_s'], 1)} s/round, "
            f"start {_n(s['startup_s'], 0)} s"
        )
    return "; ".join(parts)


def details_utility(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    summary = r["summary"]
    parts = []
    for adapter, rows in summary.items():
        bases = [v["eval_loss_by_round"][0] for v in r["runs"][adapter]["central"].values()]
        base = sum(bases) / len(bases)
        cells = [f"base {base:.2f}"]
        for name, v in rows.items():
            share = "" if name == "central" else f" ({_n(v['recovered_share']['mean'])})"
            cells.append(f"{name} {v['final_loss']['mean']:.2f}{share}")
        parts.append(f"{adapter}: " + ", ".join(cells))
    ratio = r.get("uplink_ffa_over_lora")
    tail = f"; uplink ffa ÷ lora {_n(ratio)}" if ratio is not None else ""
    seeds = len(r.get("schedule", {}).get("seeds", [])) or "?"
    return (
        "; ".join(parts)
        + tail
        + f" — final held-out loss, mean of {seeds} seed(s) (share of central's gain)"
    )


def details_export(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    parts = []
    for name, f in r.get("formats", {}).items():
        if name == "merged-fp32":
            parts.append(f"fp32 {_mib(f['bytes'])}")
            continue
        parts.append(
            f"{name} {_mib(f['bytes'])} ({f['relative_size']:.2f}×, KL {f['kl']:.1e}, "
            f"top-1 {f['top1_agreement']:.3f}, {f['gate']})"
        )
    return "; ".join(parts)


def details_audit(r: dict[str, Any]) -> str:
    parts = [f"{r['canaries']} canaries, {r['rounds']} rounds"]
    for name, v in r.get("variants", {}).items():
        parts.append(
            f"{name}: ε ≥ {v['epsilon_lower_bound']:.2f} vs claimed {v['claimed_epsilon']:.2f} "
            f"({v['correct']}/{v['guesses']} right, at most {v['max_possible']:.2f} showable; "
            f"{v['wall_s']:.0f} s)"
        )
    return "; ".join(parts)


def details_distributed_dp(r: dict[str, Any]) -> str:
    runs, rows = r["runs"], r["summary"]
    parts = [f"{r['schedule']['rounds']} rounds; final held-out loss"]
    for name in ("nondp", "central_gaussian", "ddg_b16", "ddg_b20", "ddg_b32"):
        if name in rows:
            cell = f"{name} {rows[name]['final_loss']:.4f}"
            if name.startswith("ddg_"):
                cell += (
                    f" (noise {rows[name]['noise_std_vs_central']:.4f}× central, "
                    f"{runs[name]['uplink_bytes_per_value']:.3f} B/value, "
                    f"ε {runs[name]['max_device_epsilon']:.2f})"
                )
            parts.append(cell)
    return "; ".join(parts)


DETAILS: dict[str, Callable[[dict[str, Any]], str]] = {
    "dp_overhead": details_dp,
    "secagg_overhead": details_secagg,
    "efficiency": details_efficiency,
    "fleet_scale": details_scale,
    "utility": details_utility,
    "export_formats": details_export,
    "audit": details_audit,
    "distributed_dp": details_distributed_dp,
}


def figure_cell(r: dict[str, Any]) -> str:
    if "skipped" in r or "error" in r:
        return "–"
    fig = r.get("figure")
    if fig is None:
        return "– (no valid figure)" if "invalid" in r else "–"
    target = r.get("target")
    if target is None:
        return f"**{_n(fig)}**"
    sign = "≥" if r.get("bench") == "utility" else "≤"
    verdict = "met" if r.get("meets_target") else "missed"
    return f"**{_n(fig)}** (target {sign} {_n(target)}: {verdict})"


def when_cell(r: dict[str, Any]) -> str:
    suite = r.get("suite", {})
    m = r.get("machine", {})
    load = m.get("loadavg_at_end")
    where = f"{m.get('cpus', '?')} cores" if m else ""
    if load:
        where += f", load {load[0]:.1f}"
    return ", ".join(x for x in (suite.get("date"), suite.get("mode"), where) if x)


def row(name: str, r: dict[str, Any]) -> str:
    try:
        details = DETAILS[name](r)
        if "invalid" in r:
            details = f"**not valid**: {r['invalid']}. As measured: {details}"
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        details = r.get("error") or r.get("skipped") or f"(cannot summarize: {err!r})"
    return f"| {WHAT[name]} | {figure_cell(r)} | {details} | {when_cell(r)} |"


def render(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| benchmark | figure | today's numbers | run |",
        "| --- | --- | --- | --- |",
    ]
    for name in ORDER:
        if name in results:
            lines.append(row(name, results[name]))
    return "\n".join(lines)


def load(results_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for name in ORDER:
        path = results_dir / f"{name}.json"
        if path.is_file():
            out[name] = json.loads(path.read_text())
    return out


def splice(text: str, table: str) -> str:
    """``text`` with everything between the markers replaced by ``table``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README has no '{BEGIN}' ... '{END}' block")
    return text[: start + len(BEGIN)] + "\n" + table + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/report.py", description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=BENCH / "results")
    p.add_argument("--readme", type=Path, default=BENCH.parent / "README.md")
    p.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    args = p.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    new = splice(text, render(load(args.results)))
    if args.check:
        return 0 if new == text else 1
    if new != text:
        args.readme.write_text(new, encoding="utf-8")
    print(f"report: {args.readme} table from {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
