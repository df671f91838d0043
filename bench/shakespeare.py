"""How much of the non-private gain does DP keep? tinyshakespeare, one device per role.

Runs the simulated fleet twice on ``../shared/data/tinyshakespeare.txt`` (the
LEAF Shakespeare setup: every speaking role is a device, one speech is one
record), from the same seed, devices and schedule:

* ``dp_secagg``: DP-SGD on every device (the configured ε budget) + SecAgg+;
* ``non_dp``: no DP-SGD, no SecAgg+ (the same strategy, plain FedAvg of updates).

Prints one JSON object to stdout: per variant the coordinator's eval loss before
and after training, the loss reduction, ε (DP variant) and wall time; and the
headline ``figure``: DP loss reduction / non-DP loss reduction, i.e. the fraction
of the non-private improvement that the private run keeps. Everything else the
libraries print goes to stderr. Without the play it prints ``{"skipped": ...}``
and exits 0.

    .venv/bin/python bench/shakespeare.py [--devices 20] [--rounds 5] [--local-steps 10]
                                          [--seed 0] [--out DIR [--force]]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchkit import stdout_to_stderr  # bench/ is on sys.path when a bench script runs

REPO = Path(__file__).resolve().parents[1]
PLAY = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

# Measured on 2 busy cores (load ≈ 5): DP-SGD + SecAgg+ ≈ 115 s, non-DP ≈ 55 s at these defaults.
DEFAULT_DEVICES = 20
DEFAULT_ROUNDS = 5
DEFAULT_LOCAL_STEPS = 10

VARIANTS: dict[str, dict[str, Any]] = {
    "dp_secagg": {"privacy": {"enabled": True}, "secagg": {"enabled": True}},
    "non_dp": {"privacy": {"enabled": False}, "secagg": {"enabled": False}},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/shakespeare.py",
        description=(
            "Federated LoRA on tinyshakespeare by speaking role, with DP-SGD + SecAgg+ and "
            "without: prints one JSON object with both runs and the share of the non-DP "
            "eval-loss reduction the DP run keeps."
        ),
    )
    p.add_argument("--devices", type=int, default=DEFAULT_DEVICES, help="roles (devices)")
    p.add_argument(
        "--devices-per-round",
        type=int,
        default=None,
        help="devices sampled per round (default: half the devices, at least 3)",
    )
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="federated rounds")
    p.add_argument(
        "--local-steps", type=int, default=DEFAULT_LOCAL_STEPS, help="DP-SGD steps per round"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for roles, sampling and noise")
    p.add_argument(
        "--out", type=Path, default=None, help="parent of the two run dirs (default: a temp dir)"
    )
    p.add_argument("--force", action="store_true", help="overwrite run dirs left under --out")
    return p.parse_args(argv)


def base_config(args: argparse.Namespace) -> Any:
    from fedlora.config import FedloraConfig

    per_round = args.devices_per_round
    if per_round is None:
        per_round = min(args.devices, max(3, args.devices // 2))
    return FedloraConfig().replace(
        seed=args.seed,
        data={"path": str(PLAY), "partition": "natural"},
        fleet={"num_devices": args.devices, "devices_per_round": per_round},
        training={"rounds": args.rounds, "local_steps": args.local_steps},
        export={"enabled": False},
    )


def run_variant(cfg: Any, run_dir: Path, force: bool = False) -> dict[str, Any]:
    """One simulated run; the numbers the comparison needs, read back from RUN_DIR."""
    from fedlora import runtime
    from fedlora.simulate import simulate

    t0 = time.perf_counter()
    try:
        with stdout_to_stderr():
            summary = simulate(cfg, run_dir, force=force, show_progress=False)
    finally:
        runtime.clear()  # the next variant starts from cold caches, like a fresh process
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = summary["eval_loss_round0"], summary["eval_loss_final"]
    out: dict[str, Any] = {
        "dp": summary["dp"],
        "secagg": summary["secagg"],
        "eval_loss_round0": first,
        "eval_loss_final": last,
        "loss_reduction": {"absolute": first - last, "relative": (first - last) / first},
        "eval_loss_by_round": [r["eval_loss"] for r in rows],
        "devices_aggregated_per_round": [r["num_devices"] for r in rows[1:]],
        "simulate_wall_s": summary["wall_s"],
        "wall_s": round(wall, 2),
        "run_dir": str(run_dir),
    }
    if cfg.privacy.enabled:
        out["privacy"] = {**summary["privacy"], **_noise(run_dir)}
        out["max_epsilon"] = summary["privacy"]["max_epsilon"]
    return out


def _noise(run_dir: Path) -> dict[str, Any]:
    from fedlora.privacy import PrivacyLedger

    ledger = PrivacyLedger.load(run_dir / "privacy" / "ledger.json")
    sigmas = [ev.noise_multiplier for ev in ledger.events]
    rates = [ev.sample_rate for ev in ledger.events]
    return {
        "events": len(ledger.events),
        "noise_multiplier": {"min": min(sigmas), "max": max(sigmas)},
        "sample_rate": {"min": min(rates), "max": max(rates)},
    }


def headline(results: dict[str, dict[str, Any]], cfg: Any) -> dict[str, Any]:
    dp = results["dp_secagg"]["loss_reduction"]["absolute"]
    plain = results["non_dp"]["loss_reduction"]["absolute"]
    figure = dp / plain if plain > 0 and math.isfinite(dp) else None
    note = None if figure is not None else "non-DP run did not reduce the eval loss: no ratio"
    p = cfg.privacy
    return {
        "figure": figure,
        "unit": "ratio (DP eval-loss reduction / non-DP eval-loss reduction)",
        "comparison": (
            f"share of the non-private eval-loss reduction kept by DP-SGD "
            f"(ε ≤ {p.epsilon:g}, δ = {p.delta:g}, {p.accountant.upper()} accountant) + SecAgg+, "
            f"against the same fleet, seed and schedule with neither; coordinator's held-out "
            f"loss after round {cfg.training.rounds} vs before training"
        ),
        **({"note": note} if note else {}),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not PLAY.is_file():
        print(json.dumps({"skipped": f"{PLAY} not found (tinyshakespeare is optional)"}))
        return 0

    from fedlora.errors import FedloraError

    out = args.out or Path(tempfile.mkdtemp(prefix="fedlora-bench-shakespeare-"))
    results: dict[str, dict[str, Any]] = {}
    try:
        cfg = base_config(args)
        for name, overrides in VARIANTS.items():
            print(f"bench: running {name} in {out / name}", file=sys.stderr, flush=True)
            results[name] = run_variant(cfg.replace(**overrides), out / name, args.force)
    except FedloraError as err:
        print(f"bench/shakespeare.py: {err}", file=sys.stderr)
        return err.exit_code

    resolved = json.loads((out / "dp_secagg" / "config.json").read_text())["resolved"]
    report = {
        "bench": "shakespeare",
        **headline(results, cfg),
        "data": str(PLAY),
        "fleet": {
            "devices": resolved["devices"],
            "devices_per_round": cfg.fleet.devices_per_round,
            "train_records": resolved["train_records"],
            "server_eval_records": resolved["server_eval_records"],
            "description": resolved["data_description"],
        },
        "schedule": {
            "rounds": cfg.training.rounds,
            "local_steps": cfg.training.local_steps,
            "batch_size": cfg.training.batch_size,
            "learning_rate": cfg.learning_rate,
            "seed": cfg.seed,
        },
        "cpus": os.cpu_count(),
        "variants": results,
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
