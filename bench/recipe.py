"""The DP recipe at ε = 8: which learning rate, clipping norm, batch and local steps?

Each setting overrides the config defaults (``key=value``, the keys below) and runs on:

* ``fleet``: the default fleet, ``make run``'s config (``fedlora simulate`` on the
  defaults: embedded model and data, 20 devices, 10 per round, 5 rounds, LoRA, ε = 8,
  SecAgg+), in a fresh process, export off (it does not change the loss);
* ``utility``: ``bench/utility.py --quick``'s schedule (6 tinyshakespeare roles as
  devices, 3 per round, 3 rounds, ε = 8) for each of ``--adapters``, through the product's
  device and coordinator code in this process (see that bench).

Every federated run has ``privacy.reproducible_noise`` on: a device's DP noise and batches
are seeded from (seed, device, round), so two settings at the same seed meet the same
draws and a difference between them is the setting's, not the noise's (with noise from
the OS, repeats of one setting differ as much as settings do). ``--central`` adds the
utility bench's non-DP centralized run per adapter and seed (at the base setting), the
denominator of the share of the gain.

Every run is appended to ``--log`` (JSON lines: task, adapter, setting, seed, final and
round-0 held-out loss, seconds) as it ends, so a sweep can be cut and resumed (a run
already in the log is skipped); ``--report`` reads logs and prints the table as one JSON
object.

    .venv/bin/python bench/recipe.py --log LOG [--tasks fleet utility] [--seeds 0 1 2]
        [--adapters lora ffa] [--central] [--settings "" learning_rate=0.35 ...]
    .venv/bin/python bench/recipe.py --report LOG [LOG ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import benchkit as bk

#: The keys a setting may override, and the config section each belongs to.
KEYS = {
    "learning_rate": "training",
    "batch_size": "training",
    "local_steps": "training",
    "max_grad_norm": "privacy",
}
EPSILON = 8.0
QUICK = {"devices": 6, "per_round": 3, "rounds": 3}  # bench/utility.py --quick


def parse_setting(text: str) -> dict[str, float | int]:
    """``"learning_rate=0.35,max_grad_norm=2"`` → overrides; ``""``: the defaults."""
    out: dict[str, float | int] = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in KEYS:
            raise argparse.ArgumentTypeError(f"{part!r}: expected KEY=VALUE, KEY in {list(KEYS)}")
        out[key] = int(value) if key in ("batch_size", "local_steps") else float(value)
    return out


def setting_name(setting: dict[str, Any]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in sorted(setting.items())) or "defaults"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/recipe.py", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", choices=("fleet", "utility"), default=["fleet"])
    p.add_argument("--adapters", nargs="+", choices=("lora", "ffa"), default=["lora", "ffa"])
    p.add_argument(
        "--fleet-adapters", nargs="+", choices=("lora", "ffa"), default=["lora"],
        help="adapters of the fleet runs (make run's is lora)",
    )  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", type=parse_setting, default=[{}])
    p.add_argument("--central", action="store_true", help="utility: the non-DP central runs")
    p.add_argument("--log", type=Path, default=None, help="JSON lines, one per run (appended)")
    p.add_argument("--out", type=Path, default=None, help="run directories")
    p.add_argument(
        "--torch-threads", type=int, default=None,
        help="this process's torch threads (the utility runs; default OMP_NUM_THREADS, 2): "
        "1 when other work holds a core, where 2 threads wait on each other",
    )  # fmt: skip
    p.add_argument("--report", nargs="+", type=Path, default=None, help="summarize these logs")
    args = p.parse_args(argv)
    if args.report is None and args.log is None:
        p.error("--log is required to run a sweep")
    return args


# ------------------------------------------------------------------ runs


def fleet_run(setting: dict[str, Any], adapter: str, seed: int, out: Path) -> dict[str, Any]:
    """``fedlora simulate`` on the defaults with ``setting`` and ``adapter``, in a fresh
    process."""
    sections: dict[str, dict[str, Any]] = {"training": {}, "privacy": {}}
    for key, value in setting.items():
        sections[KEYS[key]][key] = value
    cfg = bk.config_dict(
        seed=seed,
        lora={"variant": adapter},
        training=sections["training"],
        privacy={**sections["privacy"], "epsilon": EPSILON, "reproducible_noise": True},
        export={"enabled": False},
    )
    run = bk.simulate_child(cfg, out / f"fleet-{adapter}-{setting_name(setting)}-s{seed}")
    rows = [r for r in run.rows if "eval_loss" in r]
    return {
        "eval_loss_by_round": [r["eval_loss"] for r in rows],
        "max_epsilon": run.summary["privacy"]["max_epsilon"],
        "simulation_s": run.summary["wall_s"],
        "process_s": round(run.wall_s, 1),
    }


def utility_run(
    setting: dict[str, Any], adapter: str, seed: int, eps: float | None, out: Path
) -> dict[str, Any]:
    """bench/utility.py --quick's schedule, federated at ``eps`` or central non-DP (None)."""
    import utility

    args = argparse.Namespace(
        **QUICK,
        local_steps=setting.get("local_steps"),
        batch_size=setting.get("batch_size"),
        learning_rate=setting.get("learning_rate"),
        max_grad_norm=setting.get("max_grad_norm"),
        reproducible_noise=True,
    )
    records, _ = utility.private_roles(utility.PLAY, QUICK["devices"])
    data = utility.write_jsonl(records, out / "private_roles.jsonl")
    cfg = utility.config(args, data, adapter, seed, eps)
    started = time.perf_counter()
    with bk.stdout_to_stderr():
        if eps is None:
            res = utility.central(cfg, None)
        else:
            res = utility.federated(cfg, Path(tempfile.mkdtemp(prefix=f"{adapter}-", dir=out)))
    res["process_s"] = round(time.perf_counter() - started, 1)
    return res


def resolved(setting: dict[str, Any], adapter: str) -> dict[str, Any]:
    """The setting with every swept key filled in from the config defaults (the learning
    rate's is the adapter variant's)."""
    from fedlora.config import FedloraConfig

    cfg = FedloraConfig().replace(lora={"variant": adapter})
    out = {k: setting.get(k, getattr(getattr(cfg, s), k)) for k, s in KEYS.items()}
    out["learning_rate"] = setting.get("learning_rate", cfg.learning_rate)
    return out


def done(log: Path) -> set[tuple[Any, ...]]:
    if not log.is_file():
        return set()
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {(r["task"], r["adapter"], r["variant"], r["setting_name"], r["seed"]) for r in rows}


def sweep(args: argparse.Namespace) -> None:
    out = args.out or Path(tempfile.mkdtemp(prefix="fedlora-bench-recipe-"))
    jobs: list[tuple[str, str, str, dict[str, Any], int]] = []
    if args.central and "utility" in args.tasks:
        jobs += [("utility", a, "central", {}, s) for a in args.adapters for s in args.seeds]
    for setting in args.settings:
        for task in args.tasks:
            adapters = args.adapters if task == "utility" else args.fleet_adapters
            jobs += [(task, a, "fed_dp_eps8", setting, s) for a in adapters for s in args.seeds]
    skip = done(args.log)
    for task, adapter, variant, setting, seed in jobs:
        name = setting_name(setting)
        if (task, adapter, variant, name, seed) in skip:
            bk.log(f"recipe: {task} {adapter} {variant} {name} seed {seed}: in the log")
            continue
        bk.log(f"recipe: {task} {adapter} {variant} {name} seed {seed}")
        if task == "fleet":
            res = fleet_run(setting, adapter, seed, out)
        else:
            eps = None if variant == "central" else EPSILON
            res = utility_run(setting, adapter, seed, eps, out)
        curve = res.pop("eval_loss_by_round")
        row = {
            "task": task,
            "adapter": adapter,
            "variant": variant,
            "setting_name": name,
            "setting": resolved(setting, adapter),
            "seed": seed,
            "noise": "reproducible (seeded from seed, device, round)",
            "round0_loss": curve[0],
            "final_loss": curve[-1],
            "eval_loss_by_round": curve,
            **res,
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        bk.log(f"  → {curve[-1]:.4f} in {res['process_s']} s")
        args.log.parent.mkdir(parents=True, exist_ok=True)
        with args.log.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------ report


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.mean(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4)}  # fmt: skip


def report(logs: list[Path]) -> dict[str, Any]:
    """Per task, adapter and setting: final loss and (utility) share of the central gain,
    mean/min/max over seeds; the first run of each (task, adapter, setting, seed) counts."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for log in logs:
        for line in log.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                key = (r["task"], r["adapter"], r["variant"], r["setting_name"], r["seed"])
                rows.setdefault(key, r)
    central = {
        (k[1], k[4]): r["final_loss"]
        for k, r in rows.items()
        if k[0] == "utility" and k[2] == "central"
    }
    table: dict[str, Any] = {}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for (task, adapter, variant, name, _), r in rows.items():
        if variant != "central":
            groups.setdefault((task, adapter, name), []).append(r)
    for (task, adapter, name), runs in sorted(groups.items()):
        entry: dict[str, Any] = {
            "setting": runs[0]["setting"],
            "seeds": sorted(r["seed"] for r in runs),
            "final_loss": _stats([r["final_loss"] for r in runs]),
            "gain_nats": _stats([r["round0_loss"] - r["final_loss"] for r in runs]),
            "process_s": _stats([r["process_s"] for r in runs]),
        }
        if task == "fleet":
            entry["simulation_s"] = _stats([r["simulation_s"] for r in runs])
        shares = [
            (r["round0_loss"] - r["final_loss"]) / (r["round0_loss"] - central[adapter, r["seed"]])
            for r in runs
            if task == "utility" and (adapter, r["seed"]) in central
        ]
        if shares and len(shares) == len(runs):
            entry["share_of_central_gain"] = _stats(shares)
        table.setdefault(f"{task}/{adapter}", {})[name] = entry
    return {
        "bench": "recipe",
        "epsilon": EPSILON,
        "noise": "reproducible (privacy.reproducible_noise: seeded from seed, device, round)",
        "central_final_loss": {f"{a}/seed{s}": v for (a, s), v in sorted(central.items())},
        "table": table,
        "logs": [str(p) for p in logs],
        "machine": bk.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bk.setup_env()
    if args.report:
        bk.emit(report(args.report))
        return 0
    import torch

    torch.set_num_threads(args.torch_threads or int(os.environ.get("OMP_NUM_THREADS", "2")))
    sweep(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
