"""``fedlora audit --out AUDIT_DIR``: measure a lower bound on ε from one simulated run.

Runs the simulation of ``fedlora simulate`` with canary records inserted through the
audit's own data hook, scores every canary, and writes ``AUDIT_DIR/audit.json`` next
to the run's usual artefacts; ``fedlora report AUDIT_DIR`` shows it beside the claim.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedlora.argtypes import open_unit_interval, positive_int
from fedlora.errors import ConfigError

EPILOG = """\
what the number means:
  The audit guesses, from the final model alone, which canaries were trained on, and
  turns the number of right guesses into the largest ε that an (ε, δ)-DP run would
  produce that many right guesses with probability under 1 − confidence (Steinke,
  Nasr & Jagielski 2023). It is a LOWER bound: a bound at or below the claimed ε is
  what a correct run shows and is no proof that the claim holds; a bound above the
  claim means the claim is false (or a 1-in-20 accident at 95% confidence). M
  canaries can show at most about ln(M) − 1 (audit.json: max_possible), so a
  claim of ε = 8 cannot be refuted by any audit this size; the audit's power is
  shown by its tests, which switch the noise off.
  Unit: one record of one device (record-level DP, what each device's DP-SGD
  protects); device-level canaries need device-level DP.

examples:
  fedlora audit --out runs/audit                     # default fleet, 256 canaries, seed 0
  fedlora audit --out runs/audit --canaries 512 --seed 3 --force
  fedlora report runs/audit --format md              # the audit beside the claimed ε
"""


def add_audit_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``fedlora audit`` to the CLI's subparsers; returns the new parser."""
    from fedlora.audit.run import DEFAULT_CANARIES

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "audit",
        help="empirical privacy audit: a lower bound on ε from one run with canaries",
        description=(
            "Run the simulation (as fedlora simulate, same config and seed rules) with M "
            "canary records: random phrases, each given a random device and inserted into "
            "its training records with probability 1/2 (seeded). After training, score each "
            "canary by how much its loss fell from the initial to the final model, guess "
            "'in' for the highest scores and 'out' for the lowest, and compute the one-run "
            "lower bound on ε at the run's δ. Writes AUDIT_DIR/audit.json next to the run's "
            "artefacts (AUDIT_DIR is a run directory) and the privacy report with the audit "
            "beside the claimed ε. Canaries never enter a run made by fedlora simulate."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, metavar="AUDIT_DIR", required=True, help="run directory"
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="JSON or TOML config file")
    parser.add_argument(
        "--canaries",
        type=positive_int,
        default=DEFAULT_CANARIES,
        metavar="M",
        help=f"canaries (default {DEFAULT_CANARIES}; more canaries can show a larger bound)",
    )
    parser.add_argument(
        "--seed", type=int, metavar="S", help="seed of the run and the canaries (default 0)"
    )
    parser.add_argument(
        "--confidence",
        type=open_unit_interval,
        default=0.95,
        metavar="C",
        help="confidence of the lower bound (default 0.95)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing AUDIT_DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    parser.add_argument("--verbose", action="store_true", help="Flower/Ray logs and tracebacks")
    parser.set_defaults(func=cmd_audit)
    return parser


def cmd_audit(args: argparse.Namespace) -> int:
    from fedlora.audit.run import run_audit
    from fedlora.config import FedloraConfig, load_config

    if args.canaries < 2:
        raise ConfigError(f"--canaries must be at least 2, got {args.canaries}")
    cfg = load_config(args.config) if args.config else FedloraConfig()
    if args.seed is not None:
        cfg = cfg.replace(seed=args.seed)

    def say(line: str) -> None:
        if not args.quiet:
            print(f"fedlora: {line}", file=sys.stderr, flush=True)

    audit = run_audit(
        cfg,
        args.out,
        canaries=args.canaries,
        confidence=args.confidence,
        force=args.force,
        verbose=args.verbose,
        show_progress=not args.quiet,
        say=say,
    )
    print(audit_line(audit))
    print(f"audit in {args.out}/audit.json; fedlora report {args.out} shows it beside the claim")
    return 0


def audit_line(audit: dict[str, Any]) -> str:
    """One line: the bound, its confidence and what it is compared with."""
    bound = (
        f"ε ≥ {audit['epsilon_lower_bound']:.3f} with {audit['confidence']:.0%} confidence "
        f"({audit['correct']} of {audit['guesses']} guesses right, {audit['canaries']} "
        f"canaries; at most {audit['max_possible']:.2f} could be shown)"
    )
    claimed = audit.get("claimed")
    if claimed is None:
        return f"audit: {bound}; the run trained without DP, so nothing is claimed"
    return (
        f"audit: {bound}; claimed ε = {claimed['epsilon']:.3f} at δ = {claimed['delta']:g} "
        f"({claimed['accountant']})"
    )
