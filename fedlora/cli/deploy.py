"""``fedlora coordinator``, ``fedlora device``, ``fedlora run``, ``fedlora demo-data``.

The deployment commands: a coordinator service (a Flower SuperLink plus
fedlora's own gRPC services), devices that join it (one SuperNode each), a
command that starts a federated run on the connected devices, and a helper that
writes per-device data files from the embedded corpus for trials.

Addresses: a coordinator uses three consecutive ports from ``--port P``
(default 9092): P = Flower Fleet API (gRPC, what devices connect to), P+1 =
Flower Control API (HTTP, on the coordinator's loopback only), P+2 = fedlora's
ModelService / PrivacyService / RunService (gRPC; ``fedlora run`` and ``fedlora
runs`` talk to it, signed with the operator key). Every other command takes the
coordinator as ``HOST[:P]`` and derives the rest.
"""

from __future__ import annotations

import argparse
from typing import Any

from fedlora.addresses import DEFAULT_PORT


def add_deploy_parsers(sub: Any) -> None:
    """Add the deployment subcommands to the CLI's subparsers."""
    co = sub.add_parser(
        "coordinator",
        help="run the coordinator service (SuperLink + fedlora gRPC services)",
        description=(
            "Start the coordinator: a Flower SuperLink (gRPC Fleet API for devices on --host; "
            "its HTTP Control API on loopback only; TLS and device authentication on; SQLite "
            "state under DIR so a restart keeps its runs) and fedlora's ModelService, "
            "PrivacyService and RunService (gRPC, same TLS; runs start only with the operator "
            "key). Only fedlora's own installed ServerApp runs: a run whose app bundle carries "
            "code or names other apps is refused. Runs land under DIR/runs/. Stops on Ctrl-C "
            "or SIGTERM, taking every process it started with it."
        ),
        epilog=(
            "ports: P Fleet API (devices), P+1 Control API (loopback only), P+2 fedlora services "
            "(models, budgets, runs)\n"
            "first time: fedlora keys init --data-dir DIR --host <name devices use>"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    co.add_argument("--data-dir", required=True, metavar="DIR", help="state, keys, runs")
    co.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default %(default)s)"
    )
    co.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        metavar="P",
        help="Fleet API port; P+1 and P+2 are used too (default %(default)s)",
    )
    co.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no device authentication: local trials only, never on a network",
    )
    co.add_argument("--verbose", action="store_true", help="Flower logs and tracebacks")
    co.set_defaults(func=cmd_coordinator)

    dev = sub.add_parser(
        "device",
        help="run one device: a SuperNode training on local data with its own ledger",
        description=(
            "Join a coordinator as one device: a Flower SuperNode running fedlora's ClientApp "
            "on the records in --data. The device keeps its own privacy ledger under "
            "--state-dir and refuses to train past its budget whatever the coordinator asks; "
            "it runs only the ClientApp installed with fedlora, never code a run's bundle "
            "carries, and draws its DP noise from the operating system's CSPRNG."
        ),
    )
    dev.add_argument(
        "--coordinator", required=True, metavar="HOST[:P]", help="the coordinator's address"
    )
    dev.add_argument(
        "--data", required=True, metavar="PATH", help="this device's records (JSONL or .txt)"
    )
    dev.add_argument(
        "--key",
        metavar="KEY",
        help="the device's private key from `fedlora keys device` (required unless --insecure)",
    )
    dev.add_argument(
        "--root-cert",
        metavar="CA",
        help="the coordinator's CA certificate (required unless --insecure)",
    )
    dev.add_argument(
        "--device-id", help="this device's id (default: the key file's name without suffix)"
    )
    dev.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where the device keeps its ledger and models (default: ./fedlora-device-<id>)",
    )
    dev.add_argument(
        "--budget-epsilon",
        type=float,
        metavar="E",
        help="this device's own ε budget; it never trains past min(E, the run's budget)",
    )
    dev.add_argument(
        "--allow-plain",
        action="store_true",
        help="also train in rounds without SecAgg+ (by default the device refuses to send "
        "an unmasked update)",
    )
    dev.add_argument(
        "--process-per-task",
        action="store_true",
        help="run each ClientApp task (SecAgg+ sends four per round) in a fresh process, "
        "as Flower does, instead of one resident process that keeps the model loaded "
        "between tasks (slower: every task imports torch and loads the model again)",
    )
    dev.add_argument("--insecure", action="store_true", help="plaintext gRPC: local trials only")
    dev.add_argument("--verbose", action="store_true", help="Flower logs and tracebacks")
    dev.set_defaults(func=cmd_device)

    run = sub.add_parser(
        "run",
        help="start a federated run on a coordinator's connected devices",
        description=(
            "Start a federated fine-tuning run (SecAgg+ on) on the devices connected to a "
            "coordinator and stream its progress until it ends. Calls the coordinator's "
            "RunService (port P+2) signed with the operator key. The run's artefacts "
            "(adapter, ledger, privacy report, export) land under the coordinator's "
            "DIR/runs/<name>/."
        ),
        epilog=(
            "example:\n  fedlora run --coordinator coord:9092 --root-cert DIR/tls/ca.crt "
            "--key DIR/tls/operator.key --config run.json --name run-a"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--coordinator", required=True, metavar="HOST[:P]", help="the coordinator's address"
    )
    run.add_argument("--config", metavar="FILE", help="fedlora config (JSON or TOML)")
    run.add_argument(
        "--name", help="run name, the directory under DIR/runs/ (default: a timestamp)"
    )
    run.add_argument(
        "--resume",
        metavar="NAME",
        help=(
            "continue run NAME, cut off by a coordinator crash, after its last completed "
            "round, with its own config (restart the coordinator first: it marks the run "
            "interrupted)"
        ),
    )
    _add_operator_connection(run)
    run.add_argument(
        "--no-wait", action="store_true", help="return once the run is started, do not stream"
    )
    run.add_argument("--verbose", action="store_true", help="Flower logs and tracebacks")
    run.set_defaults(func=cmd_run)

    runs = sub.add_parser(
        "runs",
        help="list or stop a coordinator's runs (operator key)",
        description="List a coordinator's runs, or stop one, through its RunService (port P+2), "
        "signed with the operator key.",
    )
    runs_sub = runs.add_subparsers(dest="runs_command", required=True, metavar="COMMAND")
    ls = runs_sub.add_parser("list", help="every run: id, name, status")
    ls.add_argument(
        "--coordinator", required=True, metavar="HOST[:P]", help="the coordinator's address"
    )
    _add_operator_connection(ls)
    ls.add_argument("--json", action="store_true", help="JSON instead of a table")
    ls.set_defaults(func=cmd_runs_list)
    stop = runs_sub.add_parser("stop", help="stop a running run")
    stop.add_argument("run_id", type=int, metavar="RUN_ID", help="Flower run id (runs list)")
    stop.add_argument(
        "--coordinator", required=True, metavar="HOST[:P]", help="the coordinator's address"
    )
    _add_operator_connection(stop)
    stop.set_defaults(func=cmd_runs_stop)

    demo = sub.add_parser(
        "demo-data",
        help="write per-device data files from the embedded corpus (for trials)",
        description=(
            "Partition the embedded synthetic corpus (or --data) into one JSONL file per "
            "device, OUT/device-<i>.jsonl, as `fedlora simulate` would: for trying "
            "`fedlora device` without real device data."
        ),
    )
    demo.add_argument("--out", required=True, metavar="DIR", help="where the files go")
    demo.add_argument("--devices", type=int, default=3, help="number of devices (default 3)")
    demo.add_argument("--data", metavar="PATH", help="corpus to partition (default: embedded)")
    demo.add_argument("--seed", type=int, default=0, help="partition seed (default 0)")
    demo.set_defaults(func=cmd_demo_data)


def _add_operator_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root-cert", metavar="CA", help="the coordinator's DIR/tls/ca.crt")
    parser.add_argument(
        "--key",
        metavar="KEY",
        help="the operator key, the coordinator's DIR/tls/operator.key (required)",
    )
    parser.add_argument("--insecure", action="store_true", help="plaintext: local trials only")


def cmd_coordinator(args: argparse.Namespace) -> int:
    from fedlora.server.coordinator import serve_coordinator

    return serve_coordinator(args)


def cmd_device(args: argparse.Namespace) -> int:
    from fedlora.client.device import serve_device

    return serve_device(args)


def cmd_run(args: argparse.Namespace) -> int:
    from fedlora.cli.run import submit_run

    return submit_run(args)


def cmd_runs_list(args: argparse.Namespace) -> int:
    from fedlora.cli.run import list_runs

    return list_runs(args)


def cmd_runs_stop(args: argparse.Namespace) -> int:
    from fedlora.cli.run import stop_run

    return stop_run(args)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from fedlora.data.demo import write_demo_data

    return write_demo_data(args)
