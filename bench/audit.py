"""How close does the empirical audit come to the claim? Lower bound ÷ claimed ε.

Runs ``fedlora audit`` (canaries inserted with probability ½, scored by loss reduction,
Steinke–Nasr–Jagielski one-run bound at 95% confidence) on the default fleet (20
devices, 10 per round, DP-SGD + SecAgg+) at ε = 2 and ε = 8, each in a fresh
process, and once more at ε = 2 with the DP noise switched off on every device
(:func:`fedlora.testing.faults.noiseless_mod`: the devices still claim ε = 2) to
show what the audit can detect at this size. Figure: lower bound ÷ claimed ε at
ε = 8 (≤ 1 for a correct run; ``max_possible`` is the most these canaries could
show).

``--quick``: 128 canaries, 1 round (with 2 rounds a variant took 69–149 s at load 16,
too much for ``make bench-quick``'s 10 minutes); full: 512 canaries, the default 5 rounds.

    .venv/bin/python bench/audit.py [--quick] [--canaries M] [--rounds R] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchkit as bk

VARIANTS = (("eps2", 2.0, False), ("eps8", 8.0, False), ("eps2-noiseless", 2.0, True))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/audit.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="128 canaries, 1 round")
    p.add_argument("--canaries", type=int, default=None, help="default 512 (quick: 128)")
    p.add_argument("--rounds", type=int, default=None, help="default 5 (quick: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", nargs=3, metavar=("EPS", "NOISELESS", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.canaries is None:
        args.canaries = 128 if args.quick else 512
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    return args


def child(args: argparse.Namespace) -> int:
    """One audit in this process (the parent starts one per variant)."""
    from fedlora.audit.run import run_audit
    from fedlora.config import FedloraConfig
    from fedlora.testing.faults import noiseless_mod

    eps, noiseless, out = float(args.child[0]), args.child[1] == "1", Path(args.child[2])
    cfg = FedloraConfig().replace(
        privacy={"epsilon": eps},
        training={"rounds": args.rounds},
        export={"enabled": False},
        seed=args.seed,
    )
    mods = [noiseless_mod()] if noiseless else []
    run_audit(cfg, out, canaries=args.canaries, force=True, show_progress=False, client_mods=mods)
    return 0


def variant(args: argparse.Namespace, eps: float, noiseless: bool, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(eps), "1" if noiseless else "0", str(out)]
    cmd += ["--canaries", str(args.canaries), "--rounds", str(args.rounds)]
    cmd += ["--seed", str(args.seed)]
    t0 = time.perf_counter()
    with bk.stdout_to_stderr():
        subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    audit = json.loads((out / "audit.json").read_text())
    claimed = audit["claimed"]["epsilon"]
    return {
        "claimed_epsilon": claimed,
        "epsilon_lower_bound": audit["epsilon_lower_bound"],
        "ratio": audit["epsilon_lower_bound"] / claimed,
        "max_possible": audit["max_possible"],
        "guesses": audit["guesses"],
        "correct": audit["correct"],
        "included": audit["included"],
        "train_s": audit["train_s"],
        "score_s": audit["score_s"],
        "wall_s": round(wall, 1),
        "noise": "off (test-only fault)" if noiseless else "on",
    }


def main(argv: list[str] | None = None) -> int:
    bk.setup_env()
    args = parse_args(argv)
    if args.child:
        return child(args)
    root = args.out or Path(tempfile.mkdtemp(prefix="bench-audit-"))
    variants = {}
    for name, eps, noiseless in VARIANTS:
        bk.log(f"audit {name}: {args.canaries} canaries, {args.rounds} rounds")
        variants[name] = variant(args, eps, noiseless, root / name)
        bk.log(f"audit {name}: {json.dumps(variants[name])}")
    figure = variants["eps8"]["ratio"]
    bk.emit(
        {
            "bench": "audit",
            "figure": round(figure, 4),
            "target": 1.0,
            "meets_target": figure <= 1.0,
            "canaries": args.canaries,
            "rounds": args.rounds,
            "confidence": 0.95,
            "variants": variants,
            "machine": bk.machine(),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
