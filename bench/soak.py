"""Soak: a 100-device simulated fleet under random dropouts and malformed updates.

Runs the real coordinator and device apps on Flower's simulation engine (as
``fedlora simulate`` does), with every device's ClientApp wrapped from outside in
:func:`fedlora.testing.faults.fault_mod` (production code has no fault hooks). A
seeded plan (:func:`fedlora.testing.faults.random_faults`) gives every (device,
round) a 20% chance to drop out, at a uniformly drawn SecAgg+ stage, before or
after its code ran, and otherwise a 5% chance to send a malformed reply; only
the sampled devices' entries fire, so the rates hold among sampled devices.

**Which malformed updates, and why SecAgg+.** The soak runs the product's default,
SecAgg+, because that is what a fleet runs and the only mode with stage-by-stage
dropouts. Under SecAgg+ the update is masked inside fedlora's SecAgg+ mod, below any
mod wrapped around the app, so the malformed replies are *lies in the plaintext
claims* that travel beside the masked vector: another round, another device id,
more records than the device has, half its DP-SGD sampling rate. The coordinator
checks every device's claims before the unmask stage and rejects each liar (reasons
``round``, ``device``, ``num_examples``, ``privacy_event``); its masked vector is left
out of the sum and it is unmasked as a dropout, so the round aggregates the honest
survivors: one liar costs its own update, not the round (before fedlora's SecAgg+ the
whole round was discarded: 8 of 20 in the full soak). The device did train and spend,
so reconciliation must still bring its event into the coordinator's ledger.
``--plain`` runs the same soak without SecAgg+: dropouts at
``fit``, and malformed *tensors* too (NaN, a wrong shape, an extra tensor, a value
out of the clipping range, float64), each rejected alone while the round goes on.

Prints ONE JSON object on stdout (everything else goes to stderr):

* ``figure``: rounds that produced a new global adapter ÷ rounds run (``target``
  19/20); ``rounds_with_liars_aggregated``: rounds that rejected a liar and still
  produced one;
* ``rounds``: completed / discarded (no acceptable aggregate) /
  failed (SecAgg+ lost too many devices) / skipped (too few devices with budget);
* ``updates``: rejected (total, by reason) against the malformed replies injected,
  dropouts per stage and late updates against the dropouts injected, failures;
* ``ledger``: the coordinator's ledger (events, devices, ε per device from the run's
  PRV accountant, as in ``privacy/report.json``) **against an independent recount**:
  the events of every simulated device's own ledger (``RUN_DIR/devices/*/ledger.json``)
  and ε recomputed from those with Opacus' PRV accountant (a different
  implementation); ``max_abs_epsilon_diff`` and ``ledger_matches`` (same events,
  device by device, and every ε within 0.02 + 0.5% of the coordinator's; both are
  upper bounds with an ε slack of 0.01 each);
* ``checkpoints``: whether every global adapter checkpoint and the final adapter
  are finite;
* ``memory``: peak resident memory of this process and all its descendants (Ray's
  GCS, raylet and worker processes included), sampled with psutil every
  ``--sample-s`` seconds in a thread (``benchkit.TreeRss``), summed over processes:
  RSS (counts shared pages once per process, as ``top`` shows them) and USS (pages
  private to each process, sampled every 10th time); and the ``getrusage`` maxima for
  comparison (this process; the largest single child it waited for: not Ray's
  workers, which is why the sampling is the figure to read);
* ``wall_s``: the simulated run (engine start to the last ledger reconciliation and
  the privacy report); ``check_s``: reading it back and the recount (Opacus PRV, about
  1 s per device that trained).

Exits 1 if the ledger recount does not match or a non-finite adapter appeared, and
with fedlora's exit code if the run itself fails.

Measured on the 2-core development machine shared with other jobs (2026-11-28,
seed 0): the full soak's run took 506 s and its recount 2 min (10.6 min in all), and
715 s + 130 s at a load average of 25 (same counts: the plan and sampling are seeded);
``--quick`` 150 s + 30 s; ``--quick --plain`` 360 s + 68 s at a load average of 30.
Full soak and the quick one::

    OMP_NUM_THREADS=1 .venv/bin/python bench/soak.py [--out DIR] [--plain]
    OMP_NUM_THREADS=1 .venv/bin/python bench/soak.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchkit  # bench/ is not a package; benchkit also puts the repo on sys.path

FULL = {"devices": 100, "rounds": 20}
QUICK = {"devices": 30, "rounds": 6}
#: Rounds that must produce a new global adapter despite 5% liars and 20% dropouts.
TARGET = 19 / 20
#: |ε coordinator − ε recount| allowed: both PRV read-outs are upper bounds with
#: eps_error 0.01 each, and agree within 0.1% in tests/privacy/test_cross_check.py.
EPS_ABS_TOL = 0.02
EPS_REL_TOL = 0.005


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/soak.py",
        description=(
            "Soak the simulated fleet: 100 devices, 20 rounds, random 20% dropouts (of "
            "sampled devices, at random SecAgg+ stages) and 5% malformed updates, seeded. "
            "Prints one JSON object: rounds completed/discarded/failed/skipped, updates "
            "rejected by reason, dropouts, the coordinator's privacy ledger checked against "
            "a recount from the devices' own ledgers (ε by a second PRV implementation), "
            "whether every checkpoint stayed finite, peak memory of the process tree, wall "
            "time. Exits 1 if the ledgers disagree or an adapter went non-finite."
        ),
        epilog=(
            "--quick: 30 devices, 6 rounds (about 3 min on 2 idle cores; the full soak about "
            "11 min, 2 of them the recount)."
        ),
    )
    p.add_argument("--devices", type=int, default=None, help="simulated devices (default 100)")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds (default 20)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK['devices']} devices, {QUICK['rounds']} rounds (overridden by the flags)",
    )
    p.add_argument("--devices-per-round", type=int, default=10, help="devices sampled per round")
    p.add_argument("--local-steps", type=int, default=2, help="DP-SGD steps per round")
    p.add_argument("--batch-size", type=int, default=8, help="expected Poisson batch size")
    p.add_argument(
        "--dropout-rate", type=float, default=0.2, help="chance a sampled device drops out"
    )
    p.add_argument(
        "--malformed-rate", type=float, default=0.05, help="chance a sampled device lies"
    )
    p.add_argument(
        "--plain",
        action="store_true",
        help="no SecAgg+: dropouts at fit, malformed tensors as well as claims",
    )
    p.add_argument(
        "--timeout-s",
        type=float,
        default=300.0,
        help=(
            "secagg.timeout_s, the bound on every coordinator wait (default 300, the "
            "product's): injected dropouts answer at once, so only a loaded machine waits"
        ),
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the run and the fault plan")
    p.add_argument("--sample-s", type=float, default=0.5, help="memory sampling interval (s)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: a temp dir)")
    p.add_argument("--force", action="store_true", help="delete --out first if it is not empty")
    args = p.parse_args(argv)
    size = QUICK if args.quick else FULL
    args.devices = args.devices or size["devices"]
    args.rounds = args.rounds or size["rounds"]
    return args


def soak_config(args: argparse.Namespace) -> Any:
    from fedlora.config import FedloraConfig

    return FedloraConfig().replace(
        seed=args.seed,
        fleet={
            "num_devices": args.devices,
            "devices_per_round": args.devices_per_round,
            "min_devices": 3,
        },
        training={
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "batch_size": args.batch_size,
        },
        # the share graph is sized for the dropouts this soak injects (SecAgg+ only)
        secagg={
            "enabled": not args.plain,
            "timeout_s": args.timeout_s,
            "dropout_rate": args.dropout_rate,
        },
        export={"enabled": False},
    )


# ------------------------------------------------------------------ reading the run back
def round_outcomes(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Classify rows ≥ 1: completed (a new global adapter), discarded, failed, skipped."""
    kinds: dict[str, list[int]] = {"completed": [], "discarded": [], "failed": [], "skipped": []}
    for row in rows[1:]:
        if "skipped" in row:
            kinds["skipped"].append(row["round"])
        elif "failed" in row:
            kinds["failed"].append(row["round"])
        elif "discarded" in row or row["num_devices"] == 0:
            kinds["discarded"].append(row["round"])
        else:
            kinds["completed"].append(row["round"])
    return {
        "run": len(rows) - 1,
        **{k: len(v) for k, v in kinds.items()},
        "which": {k: v for k, v in kinds.items() if k != "completed"},
        "completed_rounds": kinds["completed"],
        "failed_reasons": [r["failed"] for r in rows[1:] if "failed" in r],
    }


def update_counts(rows: list[dict[str, Any]], fired: list[dict[str, Any]]) -> dict[str, Any]:
    """What the coordinator counted, beside what the fault mod says it did."""
    from fedlora.testing.faults import MALFORMED

    by_reason: Counter[str] = Counter()
    dropouts: Counter[str] = Counter()
    for row in rows[1:]:
        by_reason.update(row.get("rejected_by_reason", {}))
        dropouts.update(row.get("dropouts", {}))
    drops = [f for f in fired if f["action"] in ("crash_before", "crash_after")]
    bad = [f for f in fired if f["action"] == "malformed" and f["applied"]]
    return {
        "sampled": sum(r["sampled"] for r in rows[1:]),
        "aggregated": sum(r["num_devices"] for r in rows[1:]),
        "rejected": sum(by_reason.values()),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "malformed_injected": len(bad),
        "malformed_injected_by_kind": dict(sorted(Counter(f["kind"] for f in bad).items())),
        "malformed_expected_by_reason": dict(
            sorted(Counter(MALFORMED[f["kind"]] for f in bad).items())
        ),
        "dropouts": sum(dropouts.values()),
        "dropouts_by_stage": dict(sorted(dropouts.items())),
        "dropouts_injected": len(drops),
        "dropouts_injected_by_stage": dict(sorted(Counter(f["stage"] for f in drops).items())),
        "dropouts_injected_after_training": sum(
            f["action"] == "crash_after" and f["stage"] in ("collect_masked_vectors", "fit")
            for f in drops
        ),
        "late": sum(r.get("late", 0) for r in rows[1:]),
        "failures": sum(r.get("failures", 0) for r in rows[1:]),
        "declined": sum(r.get("declined", 0) for r in rows[1:]),
        "unreconciled_last_row": rows[-1].get("unreconciled"),
    }


def opacus_epsilon(events: list[Any], delta: float) -> float:
    """ε of ``events`` by Opacus' PRV accountant: not the implementation the run used."""
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    for ev in sorted(events, key=lambda e: e.round):
        for _ in range(ev.steps):
            acc.step(noise_multiplier=ev.noise_multiplier, sample_rate=ev.sample_rate)
    return float(acc.get_epsilon(delta)) if events else 0.0


def ledger_check(run_dir: Path, delta: float) -> dict[str, Any]:
    """The coordinator's ledger and report against the devices' own ledgers, recounted."""
    import warnings

    from fedlora.privacy import PrivacyLedger

    coordinator = PrivacyLedger.load(run_dir / "privacy" / "ledger.json")
    report = json.loads((run_dir / "privacy" / "report.json").read_text())
    reported = {d["device"]: float(d["epsilon"]) for d in report["devices"]}
    own = {
        p.parent.name: PrivacyLedger.load(p) for p in sorted(run_dir.glob("devices/*/ledger.json"))
    }

    def key(ev: Any) -> str:
        return json.dumps(ev.to_dict(), sort_keys=True)

    mismatched = sorted(
        d
        for d in set(coordinator.devices()) | set(own)
        if sorted(map(key, coordinator.events_for(d)))
        != sorted(map(key, own[d].events_for(d) if d in own else ()))
    )
    pairs: dict[str, tuple[float, float]] = {}  # device → (coordinator's ε, recount)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about its numerical domain
        for device, ledger in own.items():
            events = ledger.events_for(device)
            if events:
                pairs[device] = (reported.get(device, 0.0), opacus_epsilon(list(events), delta))
    over = sorted(
        d for d, (a, b) in pairs.items() if abs(a - b) > EPS_ABS_TOL + EPS_REL_TOL * max(a, b)
    )
    max_diff = max((abs(a - b) for a, b in pairs.values()), default=0.0)
    events_devices = sum(len(ledger.events_for(d)) for d, ledger in own.items())
    eps = sorted(reported.values())
    return {
        "events_coordinator": len(coordinator.events),
        "events_devices_recount": events_devices,
        "devices_trained_coordinator": len(coordinator.devices()),
        "devices_trained_recount": sum(bool(ledger.events_for(d)) for d, ledger in own.items()),
        "devices_with_other_events": mismatched,
        "accountant": report["accountant"],
        "recount_accountant": "opacus.accountants.PRVAccountant",
        "delta": delta,
        "max_epsilon": eps[-1] if eps else 0.0,
        "median_epsilon_trained": eps[len(eps) // 2] if eps else 0.0,
        "max_abs_epsilon_diff": max_diff,
        "epsilon_tolerance": f"{EPS_ABS_TOL} + {EPS_REL_TOL:.1%} of ε",
        "devices_epsilon_outside_tolerance": over,
        "ledger_matches": not mismatched and not over and events_devices == len(coordinator),
    }


def checkpoint_check(run_dir: Path) -> dict[str, Any]:
    from safetensors.numpy import load_file

    files = sorted((run_dir / "checkpoints").glob("round-*.safetensors"))
    final = run_dir / "adapter" / "adapter_model.safetensors"
    bad = [
        f.name
        for f in [*files, *([final] if final.exists() else [])]
        if not all(np.isfinite(a).all() for a in load_file(str(f)).values())
    ]
    return {
        "checkpoints": len(files),
        "rounds": [int(f.stem.split("-")[1]) for f in files],
        "final_adapter": final.exists(),
        "non_finite": bad,
        "all_finite": not bad and final.exists(),
    }


def read_fired(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benchkit.setup_env()
    from fedlora.errors import FedloraError
    from fedlora.testing.faults import metrics_rows, random_faults, run_with_faults

    cfg = soak_config(args)
    out = args.out or Path(tempfile.mkdtemp(prefix="fedlora-bench-soak-"))
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"bench/soak.py: {out} is not empty (pass --force)", file=sys.stderr)
        return 2
    if out.exists() and args.force:
        shutil.rmtree(out)  # devices' ledgers span runs: a reused one would carry its spend
    out.mkdir(parents=True, exist_ok=True)
    faults = random_faults(
        args.devices,
        args.rounds,
        dropout_rate=args.dropout_rate,
        malformed_rate=args.malformed_rate,
        secagg=cfg.secagg.enabled,
        seed=args.seed,
    )
    print(
        f"bench/soak.py: {args.devices} devices, {args.rounds} rounds, "
        f"{len(faults)} planned faults → {out}",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.perf_counter()
    memory = benchkit.TreeRss(os.getpid(), interval=args.sample_s).start()
    try:
        with benchkit.stdout_to_stderr():
            coordinator = run_with_faults(cfg, out, faults, log=out / "faults.jsonl")
    except FedloraError as err:
        print(f"bench/soak.py: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        memory.stop()
    wall = time.perf_counter() - t0

    t1 = time.perf_counter()
    rows = metrics_rows(out)
    rounds = round_outcomes(rows)
    ledger = ledger_check(out, cfg.privacy.delta)
    ckpt = checkpoint_check(out)
    fired = read_fired(out / "faults.jsonl")
    check_s = time.perf_counter() - t1
    report = {
        "bench": "soak",
        "figure": rounds["completed"] / max(1, rounds["run"]),
        "unit": "ratio (rounds that produced a new global adapter / rounds run)",
        "target": TARGET,
        "meets_target": rounds["completed"] / max(1, rounds["run"]) >= TARGET,
        "rounds_aggregated": f"{rounds['completed']} of {rounds['run']}",
        "rounds_with_liars_aggregated": sum(
            1 for r in rows[1:] if r.get("rejected") and r["round"] in rounds["completed_rounds"]
        ),
        "comparison": (
            f"{args.devices} simulated devices, {args.devices_per_round} sampled per round, "
            f"{args.rounds} rounds, {'plain FedAvg' if args.plain else 'SecAgg+'} with DP-SGD, "
            f"{args.dropout_rate:.0%} of sampled devices dropping out "
            f"({'at random SecAgg+ stages' if not args.plain else 'at fit'}) and "
            f"{args.malformed_rate:.0%} sending malformed "
            f"{'claims' if not args.plain else 'tensors or claims'}; a fault-free run would "
            "complete every round"
        ),
        "ledger_matches": ledger["ledger_matches"],
        "all_checkpoints_finite": ckpt["all_finite"],
        "rounds": rounds,
        "updates": update_counts(rows, fired),
        "ledger": ledger,
        "checkpoints": ckpt,
        "eval_loss": {"round0": rows[0]["eval_loss"], "final": rows[-1]["eval_loss"]},
        "unreconciled_after_run": coordinator.budget.num_owed(),
        "memory": {
            **memory.as_dict(),
            "method": (
                "benchkit.TreeRss: psutil, this process and all its descendants (Ray's GCS, "
                "raylet, workers), RSS summed every interval_s in a thread, USS every 10th"
            ),
            "getrusage_self_maxrss_mib": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
            ),
            "getrusage_children_maxrss_mib": round(
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
            ),
        },
        "config": {
            "devices": args.devices,
            "devices_per_round": args.devices_per_round,
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "batch_size": args.batch_size,
            "secagg": cfg.secagg.enabled,
            "epsilon": cfg.privacy.epsilon,
            "delta": cfg.privacy.delta,
            "timeout_s": args.timeout_s,
            "dropout_rate": args.dropout_rate,
            "malformed_rate": args.malformed_rate,
            "seed": args.seed,
            "planned_faults": len(faults),
        },
        "machine": benchkit.machine(),
        "wall_s": round(wall, 1),
        "check_s": round(check_s, 1),
        "run_dir": str(out),
    }
    benchkit.emit(report)
    ok = ledger["ledger_matches"] and ckpt["all_finite"] and math.isfinite(rows[-1]["eval_loss"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
