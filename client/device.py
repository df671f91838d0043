"""``fedlora device``: one device joining a coordinator, as a supervised Flower SuperNode.

Before it starts anything the device checks what it can on its own side (its
key loads, its data parses, the CA exists) and asks the coordinator's
PrivacyService who it is, signed with its key: an unregistered key is told so
in one line, instead of a SuperNode retrying forever against a SuperLink that
refuses it. Then it runs Flower's SuperNode (through :mod:`fedlora.client.supernode`,
which polls promptly while a round is on) with the device's data path, id, budget
and ledger file as node config. The ledger lives under ``--state-dir`` on
the device's disk and survives restarts; the ClientApp refuses any round that
would take the device past its budget.

The SuperNode runs with ``--isolation process``: this process is its task
executor (:mod:`fedlora.appguard`) and runs each ClientApp task only after
checking that the run's app bundle is fedlora's own (no code, the installed
``fedlora.client.app:app``). The tasks run one after another in one resident
process (:mod:`fedlora.client.resident`) that keeps the model loaded between them;
``--process-per-task`` starts a fresh process for each, as Flower does. A
coordinator, even a compromised one, cannot make a device run code: a foreign
bundle is refused before anything in it is written or imported, with one line in
``clientapp.log``, and the refusal goes back to the coordinator as the task's
error reply.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from fedlora.addresses import CoordinatorAddress, coordinator_ca, flwr_home, free_port
from fedlora.client.mods import REQUIRE_SECAGG_KEY
from fedlora.errors import ConfigError, DataError, FedloraError
from fedlora.watchdog import (
    SUPERVISOR_ENV,
    die_with_parent,
    flower_path,
    stop_process,
)

log = logging.getLogger("fedlora.device")

#: SuperNode log lines that mean the coordinator refused this device's key.
_REFUSED = re.compile(
    r"PERMISSION_DENIED|UNAUTHENTICATED|Failed to activate SuperNode|Exit Code: 305", re.I
)
PREFLIGHT_TIMEOUT_S = 60.0


def node_config(values: dict[str, Any]) -> str:
    """Flower's ``--node-config`` syntax: space-separated ``key=value``, strings quoted."""
    parts = []
    for key, value in values.items():
        if isinstance(value, str):
            parts.append(f"{key}={json.dumps(value)}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _check_inputs(args: argparse.Namespace) -> tuple[Path | None, Path, Path | None, str]:
    data = Path(args.data)
    key = Path(args.key) if args.key else None
    if key is None and not args.insecure:
        raise ConfigError(
            "--key KEY is required (create one with `fedlora keys device`); "
            "only --insecure local trials run without one"
        )
    if key is not None:
        if not key.is_file():
            raise ConfigError(
                f"device key {key} does not exist: create one with `fedlora keys device`"
            )
        from fedlora.keys import load_private_key

        load_private_key(key)  # ConfigError saying what is wrong with the file
    from fedlora.data.records import read_records

    records = read_records(data)  # DataError with the line that is wrong
    if len(records) < 2:
        raise DataError(f"{data} holds {len(records)} record(s); a device needs at least 2")
    ca = coordinator_ca(args.root_cert, args.insecure)
    device_id = args.device_id or (key.stem if key is not None else data.stem)
    if args.budget_epsilon is not None and not args.budget_epsilon > 0:
        raise ConfigError(f"--budget-epsilon must be > 0, got {args.budget_epsilon}")
    return key, data, ca, device_id


def preflight(addr: CoordinatorAddress, ca: Path | None, device: str, key: Path) -> None:
    """Ask the coordinator's PrivacyService for this device's budget, signed with its key."""
    from fedlora.client.service_client import DeviceServiceClient

    client = DeviceServiceClient(addr.service, ca, device, key)
    try:
        client.wait_ready(PREFLIGHT_TIMEOUT_S)
        client.budget()
    finally:
        client.close()


def serve_device(args: argparse.Namespace) -> int:
    addr = CoordinatorAddress.parse(args.coordinator)
    key, data, ca, device = _check_inputs(args)
    state = Path(args.state_dir or f"fedlora-device-{device}").resolve()
    state.mkdir(parents=True, exist_ok=True)
    if key is not None and not args.insecure:
        preflight(addr, ca, device, key)

    values: dict[str, Any] = {
        "data-path": str(data.resolve()),
        "device-id": device,
        "ledger-path": str(state / "ledger.json"),
        REQUIRE_SECAGG_KEY: "false" if args.allow_plain else "true",
    }
    if args.budget_epsilon is not None:
        values["budget-epsilon"] = float(args.budget_epsilon)
    runtime_port = free_port()
    cmd = [
        # Flower's SuperNode, with its polling prompt while a round is on (same arguments)
        sys.executable,
        "-m",
        "fedlora.client.supernode",
        "--superlink",
        addr.fleet,
        "--node-config",
        node_config(values),
        # fedlora runs the ClientApp tasks itself, after checking each run's bundle
        "--isolation",
        "process",
        # the SuperNode's local Runtime API for those tasks: loopback, any free port
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
    ]
    if args.insecure:
        cmd.append("--insecure")
    else:
        cmd += [
            "--root-certificates",
            str(ca),
            "--auth-supernode-private-key",
            str(key.resolve()) if key is not None else "",
        ]
    flwr_home(state / "flwr")
    env = {
        **os.environ,
        "FLWR_HOME": str(state / "flwr"),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        SUPERVISOR_ENV: str(os.getpid()),
        "PATH": flower_path(),  # the SuperNode starts `flower-superexec` by name
    }
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    log_path = state / "supernode.log"
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        preexec_fn=die_with_parent,
    )
    refused = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        with log_path.open("ab") as out:
            for line in proc.stdout:
                out.write(line)
                out.flush()
                if args.verbose:
                    os.write(2, line)
                if _REFUSED.search(line.decode(errors="replace")):
                    refused.set()
                    stopping.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    from fedlora.appguard import start_executor

    app_log = (state / "clientapp.log").open("ab")
    executor = start_executor(
        "clientapp",
        f"127.0.0.1:{runtime_port}",
        None,
        output=app_log,
        env=env,
        # one process keeps the model loaded across tasks (fedlora.client.resident)
        resident=not getattr(args, "process_per_task", False),
    )
    print(
        f"fedlora device {device}: joined {addr.fleet} "
        f"({'TLS' if not args.insecure else 'INSECURE'}); ledger {state / 'ledger.json'}; "
        f"log {log_path}",
        flush=True,
    )
    try:
        while not stopping.wait(1.0):
            if proc.poll() is not None:
                break
        if refused.is_set():
            raise FedloraError(
                f"the coordinator refused device {device}'s key: ask its operator to run "
                f"`fedlora keys register --device-id {device} --public-key <{device}.pub>`"
            )
        if proc.poll() is not None and not stopping.is_set():
            raise FedloraError(f"the SuperNode exited with code {proc.returncode}; see {log_path}")
        return 0
    finally:
        executor[1].set()
        executor[0].join(timeout=15)
        stop_process(proc)
        reader.join(timeout=5)
        app_log.close()
