"""``fedlora coordinator``: a Flower SuperLink plus fedlora's gRPC services, supervised.

One command an operator runs (and restarts) on one machine. It starts:

* a ``flower-superlink`` child: the gRPC Fleet API devices connect to (on
  ``--host``), TLS and SuperNode authentication on, its state in SQLite under
  ``DIR/state/`` so a restart keeps the run history. Its HTTP Control API
  (P+1), which has no authentication and runs whatever app a bundle names, is
  bound to loopback only, whatever ``--host`` is: only this process talks to it;
* the ServerApp executor (:mod:`fedlora.appguard`): the SuperLink runs with
  ``--isolation process`` and each run's ServerApp is a ``flwr-serverapp``
  task started here, after its bundle was checked to be fedlora's own; it
  writes the run's artefacts under ``DIR/runs/<name>/``;
* fedlora's ModelService / PrivacyService / RunService (gRPC, same TLS) in
  this process: operators start, stop and follow runs through the RunService,
  signed with the operator key;
* a loop that keeps the SuperLink's registered device keys equal to
  ``DIR/registry/devices.json`` (``fedlora keys register`` / ``revoke`` while
  the coordinator runs take effect within seconds).

The SuperLink dies with the coordinator (``PR_SET_PDEATHSIG``), so killing the
coordinator, even with SIGKILL, leaves no SuperLink behind to hold the ports.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.addresses import (
    CONTROL_HOST,
    CoordinatorAddress,
    flwr_home,
    port_free,
    wait_for_port,
)
from fedlora.errors import ConfigError, FedloraError
from fedlora.server.app import RUNS_DIR_ENV
from fedlora.server.control import control_client, describe_control_error
from fedlora.watchdog import (
    SUPERVISOR_ENV,
    die_with_parent,
    flower_executable,
    flower_path,
    stop_process,
)

log = logging.getLogger("fedlora.coordinator")

SYNC_INTERVAL_S = 2.0
STARTUP_TIMEOUT_S = 60.0


@dataclass
class CoordinatorLayout:
    """Where a coordinator keeps things under its ``--data-dir``."""

    root: Path
    state: Path = field(init=False)
    runs: Path = field(init=False)
    logs: Path = field(init=False)
    flwr: Path = field(init=False)

    def __post_init__(self) -> None:
        self.state = self.root / "state"
        self.runs = self.root / "runs"
        self.logs = self.root / "logs"
        self.flwr = self.root / "flwr"

    def create(self) -> None:
        for d in (self.state, self.runs, self.logs, self.flwr):
            d.mkdir(parents=True, exist_ok=True)

    @property
    def database(self) -> Path:
        return self.state / "superlink.db"

    @property
    def info(self) -> Path:
        return self.root / "coordinator.json"


def mark_interrupted(runs: Path) -> list[str]:
    """Runs whose run.json still says "running" when the coordinator starts: none is alive."""
    from fedlora.runfiles import write_json

    cut: list[str] = []
    for path in sorted(runs.glob("*/run.json")):
        try:
            status = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if status.get("status") == "running":
            status.update(status="interrupted", interrupted_at=time.time())
            write_json(path, status)
            cut.append(path.parent.name)
    return cut


def stop_unfinished_runs(control: str, root_cert: Path | None) -> list[int]:
    """Stop runs the SuperLink's database still has open: their ServerApp died with us.

    Without this a restarted SuperLink would hand the run to a fresh ServerApp,
    which would start it over on devices that already spent budget on it.
    """
    from flwr.proto.control_pb2 import ListRunsRequest, StopRunRequest

    stopped: list[int] = []
    with control_client(control, root_cert, insecure=root_cert is None) as client:
        for run_id, run in client.ListRuns(ListRunsRequest()).run_dict.items():
            if run.status.status != "finished":
                try:
                    client.StopRun(StopRunRequest(run_id=run_id))
                except Exception as exc:
                    log.warning("could not stop run %s: %s", run_id, describe_control_error(exc))
                    continue
                stopped.append(int(run_id))
                print(f"fedlora coordinator: stopped run {run_id}, cut off by the restart")
    return stopped


def superlink_command(
    layout: CoordinatorLayout, addr: CoordinatorAddress, tls: Any | None
) -> list[str]:
    cmd = [
        flower_executable("flower-superlink"),
        "--database",
        str(layout.database),
        "--fleet-api-address",
        addr.fleet,
        # The Control API (and the Runtime API the ServerApp uses): loopback only.
        "--host",
        CONTROL_HOST,
        "--port",
        str(addr.port + 1),
        # fedlora starts the ServerApp tasks itself, after checking their bundle.
        "--isolation",
        "process",
        "--disable-runtime-dependency-installation",
    ]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += [
            "--ssl-ca-certfile",
            str(tls.ca),
            "--ssl-certfile",
            str(tls.cert),
            "--ssl-keyfile",
            str(tls.key),
            "--enable-supernode-auth",
        ]
    return cmd


class RegistrySync:
    """Keep the SuperLink's registered SuperNode keys equal to fedlora's device registry."""

    def __init__(self, data_dir: Path, control: str, root_cert: Path | None) -> None:
        from fedlora.keys import DeviceRegistry

        self.registry = DeviceRegistry(data_dir)
        self.control = control
        self.root_cert = root_cert
        self._seen: float | None = None
        self.registered: dict[str, int] = {}  # device id → SuperLink node id

    def _stamp(self) -> float:
        p = self.registry.path
        return p.stat().st_mtime_ns if p.exists() else 0.0

    def sync(self, force: bool = False) -> None:
        from flwr.proto.control_pb2 import (
            ListNodesRequest,
            RegisterNodeRequest,
            UnregisterNodeRequest,
        )

        stamp = self._stamp()
        if not force and stamp == self._seen:
            return
        wanted = {d: dev.flower_public_key() for d, dev in self.registry.devices().items()}
        with control_client(self.control, self.root_cert, insecure=False) as client:
            listed = client.ListNodes(ListNodesRequest())
            by_key = {
                bytes(n.public_key): int(n.node_id)
                for n in listed.nodes_info
                if not n.unregistered_at
            }
            for device, key in wanted.items():
                if key in by_key:
                    self.registered[device] = by_key[key]
                    continue
                res = client.RegisterNode(RegisterNodeRequest(public_key=key, name=device))
                self.registered[device] = int(res.node_id)
                log.info("registered device %s (node %s)", device, res.node_id)
            keep = set(wanted.values())
            for key, node_id in by_key.items():
                if key not in keep:
                    client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
                    log.info("unregistered node %s (its key was revoked)", node_id)
        self._seen = stamp


def serve_coordinator(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir).resolve()
    addr = CoordinatorAddress(args.host, int(args.port))
    layout = CoordinatorLayout(data_dir)
    tls = None
    if not args.insecure:
        from fedlora.keys import tls_files

        tls = tls_files(data_dir)  # ConfigError with the `fedlora keys init` hint if missing
    for host, port, what in (
        (addr.host, addr.port, "Fleet API"),
        (CONTROL_HOST, addr.port + 1, "Control API, on loopback"),
    ):
        if not port_free(host, port):
            raise ConfigError(
                f"port {port} ({what}) on {host} is in use: stop what holds it or pick "
                "another --port (the coordinator uses P, P+1 and P+2)"
            )
    if not port_free(addr.host, addr.port + 2):
        raise ConfigError(f"port {addr.port + 2} (fedlora services) on {addr.host} is in use")
    layout.create()
    layout.info.unlink(missing_ok=True)  # left behind by a coordinator that was killed
    flwr_home(layout.flwr)
    for name in mark_interrupted(layout.runs):
        print(
            f"fedlora coordinator: run {name} was cut off by a restart (run.json: interrupted); "
            f"continue it with `fedlora run --resume {name}`"
        )

    env = {
        **os.environ,
        RUNS_DIR_ENV: str(layout.runs),
        "FLWR_HOME": str(layout.flwr),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "TOKENIZERS_PARALLELISM": "false",
        SUPERVISOR_ENV: str(os.getpid()),
        # The SuperLink starts `flower-superexec` by name: find it beside our Flower.
        "PATH": flower_path(),
    }
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    log_path = layout.logs / "superlink.log"
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            superlink_command(layout, addr, tls),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=die_with_parent,
        )
    service = None
    executor: tuple[threading.Thread, threading.Event] | None = None
    app_log = (layout.logs / "serverapp.log").open("ab")
    try:
        alive = lambda: proc.poll() is None  # noqa: E731
        try:
            here = addr.local
            wait_for_port(here.host, here.port, STARTUP_TIMEOUT_S, alive)
            wait_for_port(CONTROL_HOST, addr.port + 1, STARTUP_TIMEOUT_S, alive)
        except FedloraError as exc:
            tail = _tail(log_path)
            raise FedloraError(
                f"the SuperLink did not start ({exc}); its log ends: {tail}"
            ) from None
        ca = tls.ca if tls is not None else None
        stop_unfinished_runs(addr.control, ca)
        sync = None
        if tls is not None:
            sync = RegistrySync(data_dir, addr.control, tls.ca)
            sync.sync(force=True)
        from fedlora.appguard import start_executor
        from fedlora.server.service import serve

        executor = start_executor("serverapp", addr.control, ca, output=app_log, env=env)
        service = serve(data_dir, addr.host, addr.port + 2, tls, control=addr.control)
        info = {
            "pid": os.getpid(),
            "superlink_pid": proc.pid,
            "fleet_api": addr.fleet,
            "control_api": addr.control,
            "fedlora_api": addr.service,
            "tls": tls is not None,
            "started_at": time.time(),
        }
        layout.info.write_text(json.dumps(info, indent=2) + "\n")
        _print_banner(addr, data_dir, tls is not None, sync)
        while not stopping.wait(SYNC_INTERVAL_S):
            if proc.poll() is not None:
                raise FedloraError(
                    f"the SuperLink exited with code {proc.returncode}; see {log_path}: "
                    + _tail(log_path)
                )
            if sync is not None:
                try:
                    sync.sync()
                except Exception as exc:  # a bad registry edit must not take the fleet down
                    log.warning("device registry sync failed: %s", describe_control_error(exc))
        print("fedlora coordinator: stopping", flush=True)
        return 0
    finally:
        if service is not None:
            service.stop(grace=2).wait()
        if executor is not None:
            executor[1].set()
            executor[0].join(timeout=15)
        stop_process(proc)
        app_log.close()
        layout.info.unlink(missing_ok=True)


def _print_banner(addr: CoordinatorAddress, data_dir: Path, secure: bool, sync: Any) -> None:
    lines = [
        "fedlora coordinator ready",
        f"  Fleet API (devices, gRPC{' + TLS' if secure else ''}):  {addr.fleet}",
        f"  fedlora services (gRPC{' + TLS' if secure else ''}):     {addr.service}"
        "  (models, budgets; runs with the operator key)",
        f"  Control API (HTTP{'S' if secure else ''}, loopback only):  {addr.control}",
        f"  state and runs: {data_dir}",
    ]
    if secure:
        n = len(sync.registered) if sync is not None else 0
        lines += [
            f"  registered devices: {n}",
            "to start a run (operator key):",
            f"  fedlora run --coordinator {addr.fleet} --root-cert {data_dir}/tls/ca.crt "
            f"--key {data_dir}/tls/operator.key --config FILE --name NAME",
            "to add a device:",
            "  fedlora keys device --out KEYS --device-id ID",
            f"  fedlora keys register --data-dir {data_dir} --device-id ID "
            "--public-key KEYS/ID.pub",
            f"  fedlora device --coordinator {addr.fleet} --data PATH --key KEYS/ID.key "
            f"--root-cert {data_dir}/tls/ca.crt",
        ]
    else:
        lines += [
            "WARNING: --insecure: no TLS, no device authentication. Local trials only.",
            f"  fedlora device --coordinator {addr.fleet} --data PATH --key KEY --insecure",
            "runs still need the operator key (`fedlora keys init --data-dir DIR` makes it):",
            f"  fedlora run --coordinator {addr.fleet} --insecure "
            f"--key {data_dir}/tls/operator.key --config FILE --name NAME",
        ]
    print("\n".join(lines), flush=True)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    import re

    clean = [re.sub(r"\x1b\[[0-9;]*m", "", t).strip() for t in text[-lines:]]
    return " | ".join(t for t in clean if t) or "(empty log)"
