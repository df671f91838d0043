"""The ``fedlora`` command line.

Every user error is one line on stderr and a non-zero exit code (see
``fedlora.errors``); tracebacks are for bugs, and ``--verbose`` shows them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from fedlora.argtypes import positive_float, positive_int
from fedlora.errors import ConfigError, FedloraError

EPILOG = """\
examples:
  fedlora simulate --out runs/demo                 # embedded model and fleet, DP + SecAgg+
  fedlora simulate --out runs/s --data fleet.jsonl --devices 50 --rounds 10 --epsilon 4
  fedlora simulate --out runs/plain --no-secagg    # same strategy without secure aggregation
  fedlora simulate --resume runs/demo              # continue a run cut off by a crash
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlora",
        description="Federated LoRA fine-tuning with DP-SGD (Opacus) and SecAgg+ (Flower).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", dest="show_version", action="store_true", help="print versions and exit"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sim = sub.add_parser(
        "simulate",
        help="run a simulated device fleet end to end (train, aggregate, export, report)",
        description=(
            "Run Flower's simulation engine: each round the coordinator samples devices with "
            "privacy budget left; each trains the LoRA adapter on its own records with DP-SGD; "
            "updates are aggregated with SecAgg+; the coordinator evaluates the new global "
            "adapter on its own held-out set. Ends with the merged, quantized model under "
            "RUN_DIR/export and the privacy report under RUN_DIR/privacy. Flags override the "
            "--config file, which overrides the built-in defaults; the resolved config is "
            "written to RUN_DIR/config.json."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = sim.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, metavar="RUN_DIR", help="run directory")
    where.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help=(
            "continue the run in RUN_DIR (killed or crashed) after its last completed round, "
            "with its own config: global adapter, ledgers and device sampler as they were"
        ),
    )
    sim.add_argument("--config", type=Path, metavar="FILE", help="JSON or TOML config file")
    sim.add_argument("--devices", type=positive_int, metavar="N", help="simulated devices")
    sim.add_argument(
        "--devices-per-round", type=positive_int, metavar="K", help="devices sampled per round"
    )
    sim.add_argument("--rounds", type=positive_int, metavar="R", help="federated rounds")
    sim.add_argument(
        "--local-steps", type=positive_int, metavar="S", help="DP-SGD steps per device per round"
    )
    sim.add_argument(
        "--data",
        metavar="PATH",
        help="JSONL with 'device' and 'text' fields, or a directory with one text "
        "file per device (default: the embedded fleet)",
    )
    sim.add_argument(
        "--partition",
        choices=["natural", "iid", "dirichlet"],
        help="how records are split into devices (default: natural, by device key)",
    )
    sim.add_argument(
        "--model",
        metavar="PATH|NAME",
        help="local Hugging Face causal-LM checkpoint, or a catalog name (`fedlora models "
        "catalog`: e.g. smollm2-135m-instruct, converted once into $FEDLORA_CACHE); a GGUF "
        "file goes through `fedlora models import-gguf` first (default: the embedded model)",
    )
    sim.add_argument(
        "--epsilon",
        type=positive_float,
        metavar="E",
        help="each device's privacy budget ε (default 8)",
    )
    sim.add_argument("--delta", type=positive_float, metavar="D", help="δ (default 1e-5)")
    sim.add_argument("--seed", type=int, metavar="S", help="seed of the whole run (default 0)")
    sim.add_argument(
        "--no-secagg",
        action="store_true",
        help="aggregate without SecAgg+ (for comparison; the coordinator then sees each update)",
    )
    sim.add_argument(
        "--no-dp",
        action="store_true",
        help="train without DP-SGD (non-private baseline; no privacy report)",
    )
    sim.add_argument("--no-export", action="store_true", help="skip merge + quantization")
    sim.add_argument("--force", action="store_true", help="overwrite an existing RUN_DIR")
    sim.add_argument(
        "--no-prefetch",
        action="store_true",
        help="do not calibrate the devices' noise ahead of their rounds in a background "
        "process at the lowest CPU priority (same σ, same results; rounds take longer)",
    )
    sim.add_argument("--quiet", action="store_true", help="no progress display")
    sim.add_argument("--verbose", action="store_true", help="Flower/Ray logs and tracebacks")

    from fedlora.cli.report import EPILOG as REPORT_EPILOG
    from fedlora.cli.report import add_report_arguments

    report = sub.add_parser(
        "report",
        help="the privacy report of a run (ε per device and round, fleet totals, plots)",
        description=(
            "Recompute every device's ε from RUN_DIR/privacy/ledger.json (an edited ledger is "
            "refused), round by round, with the run's accountant and δ; print it and write "
            "report.json, report.html (self-contained, with plots) and PNG plots. Works on a "
            "run in progress."
        ),
        epilog=REPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_report_arguments(report)

    from fedlora.cli.audit import add_audit_parser

    add_audit_parser(sub)
    from fedlora.cli.export import add_export_parser

    add_export_parser(sub)

    from fedlora.cli.deploy import add_deploy_parsers

    add_deploy_parsers(sub)
    from fedlora.cli.keys import add_keys_parser

    add_keys_parser(sub)
    from fedlora.cli.service import add_service_parsers

    add_service_parsers(sub)
    return parser


def resolve_simulate_config(args: argparse.Namespace) -> Any:
    """Defaults < --config file < flags."""
    from fedlora.config import FedloraConfig, load_config

    cfg = load_config(args.config) if args.config else FedloraConfig()
    raw = cfg.to_dict()
    sections: dict[str, dict[str, Any]] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            sections.setdefault(section, {})[key] = value

    put("fleet", "num_devices", args.devices)
    if args.devices is not None and args.devices_per_round is None:
        # Keep the per-round sample inside a smaller fleet.
        per_round = min(raw["fleet"]["devices_per_round"], args.devices)
        put("fleet", "devices_per_round", per_round)
        put("fleet", "min_devices", min(raw["fleet"]["min_devices"], per_round))
    put("fleet", "devices_per_round", args.devices_per_round)
    put("training", "rounds", args.rounds)
    put("training", "local_steps", args.local_steps)
    # Paths given on the command line are made absolute, so RUN_DIR/config.json reruns anywhere.
    put("data", "path", str(Path(args.data).resolve()) if args.data else None)
    put("data", "partition", args.partition)
    put("model", "path", _model_arg(args.model))
    put("privacy", "epsilon", args.epsilon)
    put("privacy", "delta", args.delta)
    if args.no_dp:
        put("privacy", "enabled", False)
    if args.no_secagg:
        put("secagg", "enabled", False)
    if args.no_export:
        put("export", "enabled", False)
    overrides: dict[str, Any] = dict(sections)
    if args.seed is not None:
        overrides["seed"] = args.seed
    return cfg.replace(**overrides)


def _model_arg(value: str | None) -> str | None:
    """``--model``: a catalog name as given (the run records it), a path made absolute."""
    from fedlora.catalog import catalog_entry

    if value is None or catalog_entry(value) is not None:
        return value
    return str(Path(value).resolve())


#: ``simulate`` flags that change the config: a resumed run keeps its own.
CONFIG_FLAGS = (
    "config", "devices", "devices_per_round", "rounds", "local_steps", "data", "partition",
    "model", "epsilon", "delta", "seed", "no_dp", "no_secagg", "no_export", "force",
)  # fmt: skip


def cmd_simulate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedlora.simulate import resume_simulation, simulate

    if args.resume is not None:
        given = [f for f in CONFIG_FLAGS if getattr(args, f, None) not in (None, False)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ConfigError(
                f"{flag} cannot be combined with --resume: a resumed run keeps the config in "
                f"{args.resume}/config.json"
            )
        args.out = args.resume
        summary = resume_simulation(args.resume, verbose=args.verbose, show_progress=not args.quiet)
    else:
        cfg = resolve_simulate_config(args)
        summary = simulate(
            cfg,
            args.out,
            force=args.force,
            verbose=args.verbose,
            show_progress=not args.quiet,
            prefetch=not args.no_prefetch,
        )
    console = Console()
    console.print(
        f"[bold green]done[/] in {summary['wall_s']:.0f}s: eval loss "
        f"{summary['eval_loss_round0']:.4f} → {summary['eval_loss_final']:.4f} "
        f"after {summary['rounds']} rounds"
    )
    if "privacy" in summary:
        p = summary["privacy"]
        if "max_epsilon" in p:
            console.print(
                f"privacy: worst device ε = {p['max_epsilon']:.3f} (budget "
                f"{p['budget_epsilon']:g}) at δ = {p['delta']:g}, {p['accountant']} accountant, "
                "per record"
            )
        if "device_level" in p:
            d = p["device_level"]
            console.print(
                f"privacy: worst device-level ε = {d['max_epsilon']:.3f} (budget "
                f"{d['budget_epsilon']:g}) at δ = {d['delta']:g}, {d['accountant']} accountant, "
                "per device (distributed discrete Gaussian in SecAgg+)"
            )
        if p.get("reproducible_noise"):
            console.print(
                "[bold red]warning[/]: privacy.reproducible_noise was on (research option; a "
                "version-3 config means it): the DP noise was seeded from the run's seed, so ε "
                "does not hold against anyone who has config.json"
            )
    for name, figures in summary.get("export", {}).items():
        extra = ""
        if "kl" in figures:
            extra = f", KL {figures['kl']:.2e}, top-1 {figures['top1_agreement']:.4f}"
        console.print(f"export {name}: {figures['bytes'] / 1e6:.2f} MB{extra}")
    listed = sorted(Path(p).relative_to(args.out).as_posix() for p in summary["artefacts"].values())
    console.print(f"artefacts in {args.out}/: run.json, config.json, {', '.join(listed)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.show_version:
        from fedlora.runfiles import versions

        print(json.dumps(versions(), indent=2))
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    verbose = getattr(args, "verbose", False)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        func = getattr(args, "func", None)
        if func is not None:  # subcommands that register their own handler
            return int(func(args))
        if args.command == "simulate":
            return cmd_simulate(args)
        if args.command == "export":
            from fedlora.cli.export import cmd_export

            return cmd_export(args)
        if args.command == "report":
            from fedlora.cli.report import cmd_report

            return cmd_report(args)
        raise ConfigError(f"unknown command {args.command}")
    except FedloraError as exc:
        if verbose:
            raise
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fedlora: interrupted", file=sys.stderr)
        return 130
