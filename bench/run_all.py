"""The benchmark suite: run every bench, keep its JSON, regenerate the README table.

``make bench`` runs :data:`SUITE` at full size, ``make bench-quick`` the smaller
sizes each bench documents for ``--quick`` (under 10 minutes on 2 idle cores).
Each bench runs as its own process; its one JSON object goes to
``bench/results/<name>.json`` with a ``suite`` entry added (mode, command, exit
code, elapsed seconds), its stderr to ``runs/bench/logs/<name>.err`` and its run
directories under ``runs/bench/<name>/``. The export bench measures the adapter
of a run the suite made earlier (the SecAgg+ bench's or the efficiency bench's).
Then ``bench/report.py`` renders ``bench/results/*.json`` into README.md.

    .venv/bin/python bench/run_all.py [--quick] [--only NAME ...] [--skip NAME ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
RUNS = REPO / "runs" / "bench"


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    full: tuple[str, ...] = ()
    quick: tuple[str, ...] = ("--quick",)
    runs: bool = True  # takes --out for its run directories
    extra: tuple[str, ...] = field(default=())


SUITE: tuple[Bench, ...] = (
    Bench("dp_overhead", "dp_overhead.py", runs=False),
    Bench("secagg_overhead", "secagg_overhead.py"),
    Bench("efficiency", "efficiency.py"),
    Bench("utility", "utility.py", extra=("--plot", "docs/img/utility_shakespeare.png")),
    Bench(
        "export_formats", "export_formats.py", quick=("--formats", "int8", "gguf-q8_0"), runs=False
    ),
    Bench("fleet_scale", "fleet_scale.py"),
    Bench("audit", "audit.py"),
    Bench("distributed_dp", "distributed_dp.py", runs=False),
)


def export_source(runs: Path) -> Path | None:
    """A finished run of this suite with an adapter on the default model."""
    for pattern in ("secagg_overhead/n20-secagg-*", "secagg_overhead/*-secagg-*", "efficiency/run"):
        for run in sorted(runs.glob(pattern)):
            if (run / "adapter" / "adapter_model.safetensors").is_file():
                return run
    return None


def command(bench: Bench, quick: bool, runs: Path = RUNS) -> list[str] | None:
    cmd = [sys.executable, str(BENCH / bench.script), *(bench.quick if quick else bench.full)]
    cmd += list(bench.extra)
    if bench.runs:
        cmd += ["--out", str(runs / bench.name)]
    if bench.name == "export_formats":
        source = export_source(runs)
        if source is None:
            return None
        cmd.insert(2, str(source))
    return cmd


def _short(arg: str) -> str:
    return str(Path(arg).relative_to(REPO)) if arg.startswith(str(REPO)) else arg


def run(bench: Bench, quick: bool, runs: Path = RUNS) -> dict[str, Any]:
    cmd = command(bench, quick, runs)
    suite: dict[str, Any] = {"mode": "quick" if quick else "full", "date": time.strftime("%F")}
    if cmd is None:
        return {"bench": bench.name, "skipped": "no run directory with an adapter to export"}
    log_file = runs / "logs" / f"{bench.name}.err"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    print(f"run_all: {bench.name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with log_file.open("w") as err:
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    suite.update(
        command=" ".join(["python", *(_short(c) for c in cmd[1:])]),
        exit_code=proc.returncode,
        elapsed_s=round(time.perf_counter() - t0, 1),
        log=_short(str(log_file)),
    )
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        result = {"bench": bench.name, "error": f"no JSON on stdout (exit {proc.returncode})"}
    result.setdefault("bench", bench.name)
    result["suite"] = suite
    print(
        f"run_all: {bench.name}: exit {proc.returncode}, {suite['elapsed_s']} s, "
        f"figure {result.get('figure')}",
        file=sys.stderr,
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/run_all.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="+", default=None, choices=[b.name for b in SUITE])
    p.add_argument("--skip", nargs="+", default=[], choices=[b.name for b in SUITE])
    p.add_argument("--no-report", action="store_true", help="leave README.md as it is")
    p.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    p.add_argument("--runs", type=Path, default=RUNS, help="run directories and logs")
    args = p.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    failed = []
    for bench in SUITE:
        if (args.only and bench.name not in args.only) or bench.name in args.skip:
            continue
        result = run(bench, args.quick, args.runs.resolve())
        if result.get("suite", {}).get("exit_code", 0) != 0 or "error" in result:
            failed.append(bench.name)
        path = args.results / f"{bench.name}.json"
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    total = round(time.perf_counter() - started, 1)
    print(f"run_all: done in {total} s; failed: {failed or 'none'}", file=sys.stderr)
    if not args.no_report:
        from report import main as report_main

        report_main(["--results", str(args.results)])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
