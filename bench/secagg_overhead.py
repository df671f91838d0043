"""What does SecAgg+ cost a simulated round? Round wall time and uplink, with vs without.

For each fleet size N (default 10, 20, 50 and 100; ``--quick``: 20) it runs the simulated fleet with
every device sampled every round (``devices_per_round = N``), the default local
training (DP-SGD, 10 steps of expected batch 16 on each device's own records),
once with SecAgg+ and once without, same seed, devices and schedule. The two
variants alternate (ABBA over ``--reps``), each in a fresh ``fedlora simulate``
process, so machine load hits both alike.

Round time is the coordinator's ``round_s`` (its clock from a round's first
message to the evaluated aggregate) averaged over rounds ≥ 2: round 1 also pays
each Ray worker's first model load, reported apart as ``round1_s``.

Uplink per device per round: the metrics rows' ``bytes_up_per_device`` (every
message of the round's protocol, serialized: all four SecAgg+ stages, metrics
included) when the run records it (``"bytes_source": "metrics"``); otherwise the
payload Flower 1.39's SecAgg+ primitives produce for the adapter's shapes at N devices
(``bench/uplink.py``, ``"bytes_source": "flower-primitives"``). Both relative to the
fp32 adapter (4 B a value). The Flower estimate is also reported beside the measured
bytes (``payload_from_flower_primitives``): what the same round sent before fedlora's
own SecAgg+ (int64 masked vectors, Fernet-sealed PEM key shares).

Prints one JSON object; ``figure`` is the SecAgg+/plain round-time ratio at 20 devices
(target ≤ 1.15); ``uplink_figure`` is SecAgg+'s uplink per device ÷ the fp32 adapter
at 20 devices (target ≤ 1.05; Flower 1.39's SecAgg+ sent 2.1×).

    .venv/bin/python bench/secagg_overhead.py [--quick] [--sizes 10 20 50] [--rounds 3]
                                              [--reps 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import benchkit as bk

TARGET = 1.15
UPLINK_TARGET = 1.05
HEADLINE_DEVICES = 20
VARIANTS = ("secagg", "plain")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/secagg_overhead.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="20 devices only, 2 rounds")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="fleet sizes (all sampled)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per run (≥ 2; default 3)")
    p.add_argument("--reps", type=int, default=1, help="ABBA repetitions of each variant")
    p.add_argument("--local-steps", type=int, default=None, help="default: the config's 10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="where run dirs go (default: temp)")
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = [HEADLINE_DEVICES] if args.quick else [10, 20, 50, 100]
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.rounds < 2 or args.reps < 1 or min(args.sizes) < 3:
        p.error("--rounds must be ≥ 2, --reps ≥ 1 and every size ≥ 3 (SecAgg+ needs 3)")
    return args


def run_config(n: int, secagg: bool, args: argparse.Namespace) -> dict[str, Any]:
    training: dict[str, Any] = {"rounds": args.rounds}
    if args.local_steps:
        training["local_steps"] = args.local_steps
    return bk.config_dict(
        seed=args.seed,
        fleet={"num_devices": n, "devices_per_round": n, "min_devices": 3},
        training=training,
        secagg={"enabled": secagg},
        export={"enabled": False},
    )


def summarize(runs: list[bk.ChildRun]) -> dict[str, Any]:
    later = [r for run in runs for r in run.training_rows(skip_first=1)]
    first = [r for run in runs for r in run.training_rows() if r["round"] == 1]
    out: dict[str, Any] = {
        "round_s": bk.rnd(bk.mean([r["round_s"] for r in later])),
        "round_s_samples": [bk.rnd(r["round_s"], 2) for r in later],
        "round1_s": bk.rnd(bk.mean([r["round_s"] for r in first])),
        "devices_aggregated": sorted({r["num_devices"] for r in later}),
        "run_wall_s": [round(run.wall_s, 1) for run in runs],
        "peak_rss_mib": max(run.memory["peak_rss_mib"] for run in runs),
        "incomplete_rounds": [bk.incomplete_rounds(run.rows) for run in runs],
    }
    for key in (*bk.ROUND_TIMING_KEYS, *bk.ROUND_BYTES_KEYS):
        values = [r[key] for r in later if r.get(key) is not None]
        if values:
            out[key] = bk.rnd(bk.mean(values))
    return out


def uplink(
    n: int, variant: dict[str, Any], shapes: list[tuple[int, ...]], cfg: Any
) -> dict[str, Any]:
    import uplink as up

    fp32 = up.fp32_bytes(shapes)
    if variant["secagg"]:
        est = up.secagg_uplink_bytes(
            shapes,
            n,
            num_shares=cfg.secagg.num_shares,
            reconstruction_threshold=cfg.secagg.reconstruction_threshold,
            dropout_rate=cfg.secagg.dropout_rate,
            clipping_range=cfg.secagg.clipping_range,
            quantization_range=cfg.secagg.quantization_range,
        )
        estimate: dict[str, Any] = {
            "bytes": est["total"],
            "stages": est["stages"],
            "masked_dtype": est["masked_dtype"],
        }
    else:
        estimate = {"bytes": up.plain_uplink_bytes(shapes)}
    measured = variant.get("bytes_up_per_device")
    source = "metrics" if measured is not None else "flower-primitives"
    value = measured if measured is not None else estimate["bytes"]
    return {
        "bytes": value,
        "vs_fp32": round(value / fp32, 3),
        "source": source,
        "payload_from_flower_primitives": estimate,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bk.setup_env()
    started = time.perf_counter()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedlora-bench-secagg-"))
    from fedlora import runtime
    from fedlora.config import FedloraConfig

    with bk.stdout_to_stderr():
        cfg = FedloraConfig()
        shapes = [a.shape for a in runtime.model_bundle(cfg).initial_arrays]
    sizes: dict[str, Any] = {}
    for n in args.sizes:
        runs: dict[str, list[bk.ChildRun]] = {v: [] for v in VARIANTS}
        for i, name in enumerate(bk.alternate(VARIANTS, args.reps)):
            bk.log(f"secagg_overhead: {n} devices, {name} ({i + 1}/{2 * args.reps})")
            cfg_dict = run_config(n, name == "secagg", args)
            runs[name].append(bk.simulate_child(cfg_dict, out / f"n{n}-{name}-{i}"))
        variants = {
            name: {"secagg": name == "secagg", **summarize(runs[name])} for name in VARIANTS
        }
        for name in VARIANTS:
            variants[name]["uplink_per_device"] = uplink(n, variants[name], shapes, cfg)
        sec, plain = variants["secagg"], variants["plain"]
        sizes[str(n)] = {
            "devices": n,
            "time_ratio": round(sec["round_s"] / plain["round_s"], 3),
            "uplink_ratio": round(
                sec["uplink_per_device"]["bytes"] / plain["uplink_per_device"]["bytes"], 3
            ),
            "variants": variants,
        }
    head = sizes.get(str(HEADLINE_DEVICES)) or sizes[str(args.sizes[0])]
    incomplete = {
        f"{n}/{v}": s["variants"][v]["incomplete_rounds"]
        for n, s in sizes.items()
        for v in VARIANTS
        if any(s["variants"][v]["incomplete_rounds"])
    }
    figure = (
        None
        if any(head["variants"][v]["incomplete_rounds"][0] for v in VARIANTS)
        else (head["time_ratio"])
    )
    uplink_figure = head["variants"]["secagg"]["uplink_per_device"]["vs_fp32"]
    bk.emit(
        {
            "bench": "secagg_overhead",
            "figure": figure,
            "unit": "ratio (SecAgg+ round wall time ÷ plain round wall time)",
            "comparison": (
                f"simulated rounds with SecAgg+ vs without at {head['devices']} devices, all "
                "sampled, DP-SGD local training (default config), same seed and schedule; "
                f"round_s mean over rounds 2..{args.rounds}"
            ),
            "target": TARGET,
            "meets_target": bool(figure is not None and figure <= TARGET),
            "uplink_figure": uplink_figure,
            "uplink_unit": (
                f"ratio (SecAgg+ uplink bytes per device per round at {head['devices']} "
                "devices ÷ fp32 adapter bytes)"
            ),
            "uplink_target": UPLINK_TARGET,
            "meets_uplink_target": bool(uplink_figure <= UPLINK_TARGET),
            **(
                {
                    "invalid": "rounds that did not aggregate every sampled device (their "
                    f"round_s is a timeout, not the work): {incomplete}"
                }
                if incomplete
                else {}
            ),
            "uplink_vs_fp32_adapter": {
                k: {v: s["variants"][v]["uplink_per_device"]["vs_fp32"] for v in VARIANTS}
                for k, s in sizes.items()
            },
            "fp32_adapter_bytes": 4 * sum(math.prod(s) for s in shapes),
            "sizes": sizes,
            "schedule": {"rounds": args.rounds, "reps": args.reps, "seed": args.seed},
            "quick": args.quick,
            "machine": bk.machine(),
            "wall_s": round(time.perf_counter() - started, 1),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
