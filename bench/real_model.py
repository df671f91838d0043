"""A simulated fleet on a real model: memory per simulated device, and what a round costs.

A simulated fleet must not hold one model copy per device: each Ray worker keeps
one base model (``fedlora.runtime``) and the devices it trains take turns on it.
This runs ``fedlora simulate`` in fresh child processes, side by side in one run,
for each model (the embedded default and a real one, SmolLM2-135M-Instruct by
default) with 3 and with 20 devices, every device sampled, 1 round of
``--local-steps`` DP-SGD steps under SecAgg+, no export, and samples the peak RSS
of each run's whole process tree (driver, Ray, workers).

Figure: peak RSS with 20 devices ÷ with 3 on the real model (target ≤ 1.3). Also,
per model: the round's wall time, the devices' summed training time, and DP-SGD
training throughput per device in (padded) token positions a second, in expectation
(steps × expected batch × ``data.seq_len`` ÷ the device's training time).

    .venv/bin/python bench/real_model.py [--model smollm2-135m-instruct] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import benchkit as bk

SIZES = (3, 20)  # SecAgg+ needs at least 3 devices a round


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a catalog name or a path")
    p.add_argument("--local-steps", type=int, default=2, help="DP-SGD steps per device")
    p.add_argument("--batch-size", type=int, default=8, help="expected Poisson batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="the real model only, 1 local step")
    p.add_argument("--out", type=Path, default=None, help="where run dirs go (default: temp)")
    return p.parse_args(argv)


def fleet_config(model: str | None, devices: int, args: argparse.Namespace) -> dict[str, Any]:
    return bk.config_dict(
        model={"path": model},
        fleet={"num_devices": devices, "devices_per_round": devices, "min_devices": 3},
        training={"rounds": 1, "local_steps": args.local_steps, "batch_size": args.batch_size},
        secagg={"enabled": True},
        export={"enabled": False},
        data={"server_eval_max": 32},
        seed=args.seed,
    )


def expected_tokens(run_dir: Path, devices: int) -> float:
    """Token positions the devices trained on in round 1, in expectation: devices × steps ×
    expected Poisson batch × ``data.seq_len`` (sequences are padded to it)."""
    config = json.loads((run_dir / "config.json").read_text())
    training = config["training"]
    return devices * training["local_steps"] * training["batch_size"] * config["data"]["seq_len"]


def measure(model: str | None, devices: int, args: argparse.Namespace, root: Path) -> dict:
    name = f"{'default' if model is None else Path(model).name}-{devices}"
    bk.log(f"{name}: {devices} devices, 1 round")
    run = bk.simulate_child(fleet_config(model, devices, args), root / name)
    row = run.training_rows()[0]
    out = {
        "devices": devices,
        "wall_s": bk.rnd(run.wall_s, 1),
        "round_s": bk.rnd(row.get("round_s"), 1),
        "train_s_total": bk.rnd(row.get("train_s_total"), 2),
        "framework_s": bk.rnd(row.get("framework_s"), 1),
        **run.memory,
    }
    if row.get("train_s_total"):
        tokens = expected_tokens(run.run_dir, devices)
        out["tokens_per_s_per_device"] = bk.rnd(tokens / row["train_s_total"], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bk.setup_env()
    if args.quick:
        args.local_steps = 1
    models: list[str | None] = [args.model] if args.quick else [None, args.model]
    results: dict[str, dict[str, Any]] = {}
    with bk.stdout_to_stderr(), tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        root = args.out or Path(tmp)
        for model in models:
            key = "default" if model is None else model
            results[key] = {str(n): measure(model, n, args, root) for n in SIZES}
            small, large = (results[key][str(n)]["peak_rss_mib"] for n in SIZES)
            results[key]["rss_ratio"] = bk.rnd(large / small, 3)
    figure = results[args.model]["rss_ratio"]
    bk.emit(
        {
            "bench": "real_model",
            "figure": figure,
            "unit": f"ratio (peak RSS of a {SIZES[1]}-device simulated fleet ÷ {SIZES[0]}-device, "
            f"{args.model})",
            "comparison": (
                f"fedlora simulate, 1 round, every device sampled, {args.local_steps} DP-SGD "
                f"steps at expected batch {args.batch_size}, SecAgg+, no export, "
                f"{SIZES[0]} vs {SIZES[1]} devices, per model; target ≤ 1.3"
            ),
            "models": results,
            "machine": bk.machine(),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
