"""Does memory grow with the fleet? Peak RSS and round time at 100 vs 1,000 devices.

Runs the simulated fleet at each size (default 100 and 1,000 devices) with the
same number sampled per round (default 50) and the default config otherwise
(DP-SGD + SecAgg+), each in a fresh ``fedlora simulate`` process. While a run
goes, the summed RSS of that process and all its descendants (the driver, Ray's
GCS and raylet, every ``ClientAppActor``) is sampled every 0.5 s with psutil;
the peak is kept, with the peak summed USS (pages private to each process,
sampled every 5 s) beside it. Sizes run smallest first, then in reverse for
``--reps 2`` (ABBA).

Figure: peak RSS at the largest size ÷ peak RSS at the smallest. Round time is
the coordinator's ``round_s`` (mean over rounds ≥ 1, and over rounds ≥ 2 which
leave out each worker's first model load); ``startup_s`` is the run's clock at
the round-0 evaluation (Ray start, nodes, data and model). ``--quick``: one round
of 10 sampled devices (the fleet sizes stay 100 and 1,000).

    .venv/bin/python bench/fleet_scale.py [--quick] [--sizes 100 1000] [--per-round 50]
                                          [--rounds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import benchkit as bk

TARGET = 1.2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/fleet_scale.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round of 10 sampled devices")
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--per-round", type=int, default=None, help="default 50 (quick: 10)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.per_round is None:
        args.per_round = 10 if args.quick else 50
    if len(args.sizes) < 2:
        p.error("--sizes needs at least two fleet sizes to compare")
    return args


def describe(runs: list[bk.ChildRun]) -> dict[str, Any]:
    rows = [r for run in runs for r in run.training_rows()]
    later = [r for r in rows if r["round"] >= 2]
    return {
        "peak_rss_mib": max(run.memory["peak_rss_mib"] for run in runs),
        "peak_rss_mib_samples": [run.memory["peak_rss_mib"] for run in runs],
        "peak_uss_mib": max(run.memory.get("peak_uss_mib", 0.0) for run in runs),
        "peak_processes": max(run.memory["peak_processes"] for run in runs),
        "round_s": bk.rnd(bk.mean([r["round_s"] for r in rows])),
        "round_s_after_first": bk.rnd(bk.mean([r["round_s"] for r in later])) if later else None,
        "round_s_samples": [bk.rnd(r["round_s"], 2) for r in rows],
        "startup_s": bk.rnd(bk.mean([run.rows[0]["wall_s"] for run in runs]), 1),
        "run_wall_s": [round(run.wall_s, 1) for run in runs],
        "devices_aggregated": sorted({r["num_devices"] for r in rows}),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bk.setup_env()
    started = time.perf_counter()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedlora-bench-scale-"))
    names = [str(n) for n in sorted(args.sizes)]
    runs: dict[str, list[bk.ChildRun]] = {n: [] for n in names}
    for i, n in enumerate(bk.alternate(names, args.reps)):
        bk.log(f"fleet_scale: {n} devices, {args.per_round} per round ({i + 1})")
        cfg = bk.config_dict(
            seed=args.seed,
            fleet={"num_devices": int(n), "devices_per_round": args.per_round, "min_devices": 3},
            training={"rounds": args.rounds},
            export={"enabled": False},
        )
        runs[n].append(bk.simulate_child(cfg, out / f"n{n}-{i}"))
    sizes = {n: describe(runs[n]) for n in names}
    small, large = sizes[names[0]], sizes[names[-1]]
    figure = large["peak_rss_mib"] / small["peak_rss_mib"]
    bk.emit(
        {
            "bench": "fleet_scale",
            "figure": round(figure, 3),
            "unit": (
                f"ratio (peak RSS of the run's process tree at {names[-1]} devices ÷ at {names[0]})"
            ),
            "comparison": (
                f"fedlora simulate at {' and '.join(names)} devices, {args.per_round} sampled per "
                f"round, {args.rounds} rounds, DP-SGD + SecAgg+; driver + Ray + workers' RSS "
                "summed, sampled every 0.5 s"
            ),
            "target": TARGET,
            "meets_target": bool(figure <= TARGET),
            "round_s_ratio": bk.rnd(large["round_s"] / small["round_s"]),
            "per_round": args.per_round,
            "rounds": args.rounds,
            "sizes": sizes,
            "quick": args.quick,
            "machine": bk.machine(),
            "wall_s": round(time.perf_counter() - started, 1),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
