"""``fedlora run``: start a federated run on a coordinator and follow it to the end.

The run is submitted through the SuperLink's Control API as a Flower App
Bundle (FAB). fedlora's FAB carries no code: only a ``pyproject.toml`` naming
the ServerApp and ClientApp that are *installed* on the coordinator and the
devices (``server.app:app``, ``client.app:app``), so what runs is always the
audited installed version, never code shipped with a run request. The
resolved fedlora config travels inline in the run config
(``fedlora-config-json``), checked here before anything is submitted.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from fedlora.config import FedloraConfig, load_config
from fedlora.errors import ConfigError, FedloraError
from server.control import CoordinatorAddress, control_client, describe_control_error

#: What a finished run's status looks like in the Control API.
FINISHED = "finished"
COMPLETED = "completed"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def app_pyproject(version: str) -> str:
    """The FAB's only file: which installed apps to run, and the run config keys."""
    return f"""[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "fedlora"
version = "{version}"
description = "fedlora federated LoRA fine-tuning (apps installed on coordinator and devices)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedlora"

[tool.flwr.app.components]
serverapp = "server.app:app"
clientapp = "client.app:app"

[tool.flwr.app.config]
fedlora-config = ""
fedlora-config-json = ""
run-dir = ""
resume = ""
"""


def build_fab() -> bytes:
    from flwr.cli.build import build_fab_from_files

    from fedlora import __version__

    files = {"pyproject.toml": app_pyproject(__version__).encode()}
    return build_fab_from_files(files)[0]


def resolve_run_config(args: argparse.Namespace) -> tuple[FedloraConfig | None, str]:
    """The config and run name; with ``--resume NAME`` no config (the run keeps its own)."""
    resume = getattr(args, "resume", None)
    if resume is not None:
        if args.config or args.name:
            flag = "--config" if args.config else "--name"
            raise ConfigError(
                f"{flag} cannot be combined with --resume: the run keeps its name and the "
                "config it started with"
            )
        if not _NAME.match(resume):
            raise ConfigError(f"run name {resume!r} is not a run directory name")
        return None, resume
    cfg = load_config(args.config) if args.config else FedloraConfig()
    name = args.name or time.strftime("run-%Y%m%d-%H%M%S")
    if not _NAME.match(name):
        raise ConfigError(
            f"run name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (a directory name)"
        )
    return cfg, name


def start_run(
    addr: CoordinatorAddress,
    cfg: FedloraConfig | None,
    name: str,
    root_cert: Path | None,
    insecure: bool,
) -> int:
    """Submit the run (``cfg`` None: resume the run ``name``); returns Flower's run id."""
    import hashlib

    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab_bytes = build_fab()
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    overrides: dict[str, bool | float | int | str] = {"run-dir": name}
    with control_client(addr.control, root_cert, insecure) as client:
        if cfg is None:
            # Devices read their config from the run config: the run's own, as first sent.
            overrides["resume"] = "true"
            overrides["fedlora-config-json"] = _started_with(client, name, addr)
        else:
            overrides["fedlora-config-json"] = json.dumps(cfg.to_dict())
        try:
            res = client.StartRun(
                StartRunRequest(
                    fab=fab_to_proto(fab), override_config=user_config_to_proto(overrides)
                )
            )
        except Exception as exc:
            raise FedloraError(
                f"the coordinator at {addr.control} refused the run: {describe_control_error(exc)}"
            ) from None
    if not res.HasField("run_id"):
        raise FedloraError(f"the coordinator at {addr.control} did not start the run")
    return int(res.run_id)


def _started_with(client: Any, name: str, addr: CoordinatorAddress) -> str:
    """The ``fedlora-config-json`` run ``name`` was first started with, from the SuperLink's
    run history (it outlives a coordinator restart: SQLite under ``DIR/state``)."""
    from flwr.common.serde import user_config_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest

    try:
        runs = client.ListRuns(ListRunsRequest()).run_dict
    except Exception as exc:
        raise FedloraError(
            f"cannot list the runs of the coordinator at {addr.control}: "
            f"{describe_control_error(exc)}"
        ) from None
    for run_id in sorted(runs):
        config = user_config_from_proto(runs[run_id].override_config)
        text = config.get("fedlora-config-json")
        if config.get("run-dir") == name and isinstance(text, str) and text:
            return text
    raise ConfigError(
        f"the coordinator at {addr.control} has no run named {name!r} started by `fedlora run`: "
        "check the name (its directory under DIR/runs/)"
    )


def run_status(
    addr: CoordinatorAddress, run_id: int, root_cert: Path | None, insecure: bool
) -> tuple[str, str, str]:
    """(status, sub_status, details) of a run."""
    from flwr.proto.control_pb2 import ListRunsRequest

    with control_client(addr.control, root_cert, insecure) as client:
        res = client.ListRuns(ListRunsRequest(run_id=run_id))
    run = res.run_dict[run_id]
    return run.status.status, run.status.sub_status, run.status.details


def follow(
    addr: CoordinatorAddress,
    run_id: int,
    root_cert: Path | None,
    insecure: bool,
    *,
    poll_s: float = 1.0,
    out: Any = None,
    verbose: bool = False,
) -> tuple[str, str]:
    """Print the run's log as it arrives until it finishes; returns (sub_status, details)."""
    from flwr.proto.control_pb2 import StreamLogsRequest

    out = out or sys.stdout
    after = 0.0
    while True:
        with control_client(addr.control, root_cert, insecure) as client:
            try:
                for res in client.StreamLogs(
                    StreamLogsRequest(run_id=run_id, after_timestamp=after)
                ):
                    if res.log_output:
                        out.write(_clean(res.log_output, verbose))
                        out.flush()
                    after = max(after, res.latest_timestamp)
            except Exception:  # the stream ends when the run does, or drops: check below
                pass
        status, sub, details = run_status(addr, run_id, root_cert, insecure)
        if status == FINISHED:
            return sub, details
        time.sleep(poll_s)


#: Flower's log capture repeats each line with a date prefix; the copy is dropped.
_DUPLICATE = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:[A-Z]+:")


def _clean(text: str, verbose: bool = False) -> str:
    """The run's log without colour codes, Flower's duplicate lines or (unless verbose) DEBUG."""
    kept = []
    for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines(keepends=True):
        if _DUPLICATE.match(line) or (not verbose and line.startswith("DEBUG")):
            continue
        kept.append(line)
    return "".join(kept)


def submit_run(args: argparse.Namespace) -> int:
    addr = CoordinatorAddress.parse(args.coordinator)
    root_cert = None if args.insecure or not args.root_cert else Path(args.root_cert)
    if not args.insecure and root_cert is None:
        raise ConfigError("--root-cert CA is required (the coordinator's DIR/tls/ca.crt)")
    if root_cert is not None and not root_cert.is_file():
        raise ConfigError(f"CA certificate {root_cert} does not exist")
    cfg, name = resolve_run_config(args)
    run_id = start_run(addr, cfg, name, root_cert, args.insecure)
    verb = "resumed" if cfg is None else "started"
    print(f"fedlora run: {verb} run {name} as Flower run {run_id} on {addr.control}", flush=True)
    if args.no_wait:
        return 0
    sub, details = follow(addr, run_id, root_cert, args.insecure, verbose=args.verbose)
    if sub == COMPLETED:
        print(
            f"fedlora run: run {run_id} completed; artefacts in the coordinator's runs/{name}/",
            flush=True,
        )
        return 0
    raise FedloraError(f"run {run_id} ({name}) ended {sub}: {details or 'no details'}")
