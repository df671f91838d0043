"""Deployed fedlora over gRPC + TLS: round wall time and bytes on the wire, SecAgg+ vs plain.

One coordinator and N devices run as separate processes on 127.0.0.1 (the same
commands an operator runs). Each device's traffic goes through a TCP relay
that counts the bytes crossing it (TLS records, gRPC framing, everything), so
"bytes on the wire" is what a device's network interface would carry.

The same deployment runs SecAgg+ and plain runs alternately (``--reps`` pairs),
so both variants see the same machine load; the devices start with
``--allow-plain`` so they accept the plain runs. Printed JSON: per variant the
mean round wall time (rounds ≥ 1, from the coordinator's metrics) and the mean
uplink / downlink bytes per device per round (everything a device exchanged
during the run — discovery, the app bundle, all SecAgg+ stages — divided by the
rounds), the SecAgg+/plain ratios, and uplink relative to the fp32 adapter
update a device would send without any protocol overhead.

Devices run their tasks in one resident process each (``fedlora device``'s default) or
in a fresh process per task (``--process-per-task``, Flower's way); by default the bench
measures both, one deployment after the other, and prints resident ÷ per-task.

    python bench/deployment.py [--devices 3] [--rounds 2] [--reps 1] [--runtime R] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlora.testing.deployment import LocalDeployment


def run_config(devices: int, rounds: int, secagg: bool, seed: int) -> dict[str, Any]:
    return {
        "fleet": {"num_devices": devices, "devices_per_round": devices, "min_devices": devices},
        "training": {"rounds": rounds, "local_steps": 2, "batch_size": 8},
        # DP-SGD at a fixed σ = 1 with a budget no run reaches: the runs spend from the
        # same device ledgers, and calibrated σ would make later runs noisier or decline.
        "privacy": {"epsilon": 1e9, "noise_multiplier": 1.0},
        "secagg": {"enabled": secagg, "timeout_s": 180.0},
        "export": {"enabled": False},
        "seed": seed,
    }


def adapter_fp32_bytes() -> int:
    from fedlora import runtime
    from fedlora.config import FedloraConfig

    bundle = runtime.model_bundle(FedloraConfig())
    return int(sum(a.size for a in bundle.initial_arrays) * 4)


def measure(dep: LocalDeployment, name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    before = {i: dep.bytes_on_wire(i) for i in range(dep.num_devices)}
    t0 = time.perf_counter()
    res = dep.run(name, cfg)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"run {name} failed: {res.stderr.strip()[-2000:]}")
    after = {i: dep.bytes_on_wire(i) for i in range(dep.num_devices)}
    rows = [
        json.loads(line)
        for line in (dep.run_dir(name) / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    rounds = cfg["training"]["rounds"]
    assert all(r["num_devices"] == dep.num_devices for r in rows[1:]), rows
    return {
        "round_s": statistics.mean(r["round_s"] for r in rows[1:]),
        "run_wall_s": wall,
        "up_bytes_per_device_round": statistics.mean(
            (after[i][0] - before[i][0]) / rounds for i in range(dep.num_devices)
        ),
        "down_bytes_per_device_round": statistics.mean(
            (after[i][1] - before[i][1]) / rounds for i in range(dep.num_devices)
        ),
    }


RUNTIMES = {
    # one long-lived process per device runs every task (fedlora device's default)
    "resident": (),
    # a fresh process per task, as Flower's executor runs them
    "per-task": ("--process-per-task",),
}


def measure_runtime(args: argparse.Namespace, root: Path, runtime: str) -> dict[str, Any]:
    """SecAgg+ and plain runs (``--reps`` pairs) on one deployment whose devices run their
    tasks the ``runtime`` way; per variant the means of :func:`measure`."""
    dep = LocalDeployment(root / runtime, num_devices=args.devices)
    results: dict[str, list[dict[str, Any]]] = {"secagg": [], "plain": []}
    try:
        dep.prepare()
        dep.start("--allow-plain", *RUNTIMES[runtime], count_bytes=True)
        for rep in range(args.reps):
            for variant in ("secagg", "plain") if rep % 2 == 0 else ("plain", "secagg"):
                cfg = run_config(args.devices, args.rounds, variant == "secagg", args.seed)
                results[variant].append(measure(dep, f"{variant}-{rep}", cfg))
                print(f"# {runtime} {variant}-{rep}: {results[variant][-1]}", file=sys.stderr)
    finally:
        dep.stop()
    return {
        variant: {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
        for variant, rows in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=1, help="SecAgg+/plain pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--runtime",
        choices=list(RUNTIMES),
        action="append",
        help="how devices run their tasks, repeatable (default: both, one after the other)",
    )
    parser.add_argument("--keep", help="keep the deployment's files in this directory")
    args = parser.parse_args()

    root = Path(args.keep or tempfile.mkdtemp(prefix="fedlora-bench-deploy-"))
    root.mkdir(parents=True, exist_ok=True)
    runtimes = args.runtime or list(RUNTIMES)
    try:
        by_runtime = {rt: measure_runtime(args, root, rt) for rt in runtimes}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    fp32 = adapter_fp32_bytes()
    main_rt = runtimes[0]
    out: dict[str, Any] = {
        "benchmark": "deployment",
        "devices": args.devices,
        "rounds_per_run": args.rounds,
        "reps": args.reps,
        "transport": "gRPC + TLS over 127.0.0.1 (Flower 1.39 Fleet API), separate processes",
        "runtimes": by_runtime,
        # the first runtime's figures, under the keys earlier results used
        "secagg": by_runtime[main_rt]["secagg"],
        "plain": by_runtime[main_rt]["plain"],
        "adapter_fp32_bytes": fp32,
    }
    figures = []
    for rt, res in by_runtime.items():
        figures.append(
            {
                "figure": res["secagg"]["round_s"] / res["plain"]["round_s"],
                "unit": "ratio",
                "of": f"round wall time with SecAgg+ / without ({rt} tasks, rounds >= 1)",
            }
        )
    if {"resident", "per-task"} <= set(by_runtime):
        for variant in ("secagg", "plain"):
            figures.append(
                {
                    "figure": by_runtime["resident"][variant]["round_s"]
                    / by_runtime["per-task"][variant]["round_s"],
                    "unit": "ratio",
                    "of": f"{variant} round wall time, resident task runner / a process per task",
                }
            )
    secagg, plain = out["secagg"], out["plain"]
    figures += [
        {
            "figure": secagg["up_bytes_per_device_round"] / plain["up_bytes_per_device_round"],
            "unit": "ratio",
            "of": "uplink bytes per device per round with SecAgg+ / without",
        },
        {
            "figure": secagg["up_bytes_per_device_round"] / fp32,
            "unit": "ratio",
            "of": "SecAgg+ uplink bytes per device per round / fp32 adapter update bytes",
        },
        {
            "figure": plain["up_bytes_per_device_round"] / fp32,
            "unit": "ratio",
            "of": "plain uplink bytes per device per round / fp32 adapter update bytes",
        },
    ]
    out["figures"] = figures
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
