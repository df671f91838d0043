"""``fedlora run``: start a federated run on a coordinator and follow it to the end.

``fedlora run`` is a client of the coordinator's RunService (port P+2), and
every call is signed with the operator key (``DIR/tls/operator.key``): nobody
else can start, resume or stop a run. The coordinator builds the run's Flower
App Bundle itself (no code: the apps installed on the coordinator and the
devices) and starts it on its SuperLink over loopback; the resolved fedlora
config travels in the request, checked here and again by the coordinator.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from fedlora.addresses import CoordinatorAddress, coordinator_ca
from fedlora.client.service_client import DeviceServiceClient, _method
from fedlora.config import FedloraConfig, load_config
from fedlora.errors import ConfigError, FedloraError
from fedlora.keys import OPERATOR_ID
from fedlora.v1 import run_service_pb2 as pb
from fedlora.v1 import run_service_pb2_grpc

#: What a finished run's status looks like.
FINISHED = "finished"
COMPLETED = "completed"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

START_RUN = _method(pb, "RunService", "StartRun")
RESUME_RUN = _method(pb, "RunService", "ResumeRun")
STOP_RUN = _method(pb, "RunService", "StopRun")
LIST_RUNS = _method(pb, "RunService", "ListRuns")
FOLLOW_RUN = _method(pb, "RunService", "FollowRun")
#: How long ``fedlora run`` waits to reach the coordinator before it gives up.
CONNECT_TIMEOUT_S = 30.0


class RunServiceClient(DeviceServiceClient):
    """The operator's connection to a coordinator's RunService (signed as ``operator``;
    ``caller`` signs as someone else, which the coordinator refuses: for tests)."""

    def __init__(
        self, address: str, root_cert: Path | None, key: Path, caller: str = OPERATOR_ID
    ) -> None:
        super().__init__(address, root_cert, caller, key, timeout=60.0)
        self._runs = run_service_pb2_grpc.RunServiceStub(self._channel)

    def start(self, name: str, cfg: FedloraConfig) -> int:
        req = pb.StartRunRequest(name=name, config_json=json.dumps(cfg.to_dict()))
        return int(self._unary(self._runs.StartRun, START_RUN, req).run_id)

    def resume(self, name: str) -> int:
        req = pb.ResumeRunRequest(name=name)
        return int(self._unary(self._runs.ResumeRun, RESUME_RUN, req).run_id)

    def stop(self, run_id: int) -> bool:
        req = pb.StopRunRequest(run_id=run_id)
        return bool(self._unary(self._runs.StopRun, STOP_RUN, req).stopped)

    def list(self) -> list[pb.Run]:
        return list(self._unary(self._runs.ListRuns, LIST_RUNS, pb.ListRunsRequest()).runs)

    def follow(self, run_id: int, out: Any, verbose: bool = False) -> pb.Run:
        """Print the run's log as it arrives until it finishes; returns its final state."""
        after = 0.0
        while True:
            try:
                stream = self._runs.FollowRun(
                    pb.FollowRunRequest(run_id=run_id, after_timestamp=after),
                    metadata=self._signed(FOLLOW_RUN),
                )
                for res in stream:
                    after = max(after, res.latest_timestamp)
                    if res.log_output:
                        out.write(_clean(res.log_output, verbose))
                        out.flush()
                    if res.HasField("finished"):
                        return res.finished
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise self._error(err, FOLLOW_RUN) from None
            time.sleep(1.0)  # the connection dropped: follow again from where it was


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
    if cfg.privacy.reproducible_noise:
        raise ConfigError(
            f"{args.config}: privacy.reproducible_noise is for simulations only (a config "
            "of version 3 or older means it): devices refuse noise the coordinator could "
            "predict; set it to false"
        )
    name = args.name or time.strftime("run-%Y%m%d-%H%M%S")
    if not _NAME.match(name):
        raise ConfigError(
            f"run name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (a directory name)"
        )
    return cfg, name


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


def _client(args: argparse.Namespace) -> tuple[CoordinatorAddress, RunServiceClient]:
    addr = CoordinatorAddress.parse(args.coordinator)
    root_cert = coordinator_ca(args.root_cert, args.insecure)
    if not args.key:
        raise ConfigError(
            "--key KEY is required: the operator key, the coordinator's DIR/tls/operator.key "
            "(runs are started and stopped with it)"
        )
    key = Path(args.key)
    if not key.is_file():
        raise ConfigError(f"operator key {key} does not exist")
    client = RunServiceClient(addr.service, root_cert, key)
    client.wait_ready(CONNECT_TIMEOUT_S)
    return addr, client


def submit_run(args: argparse.Namespace) -> int:
    cfg, name = resolve_run_config(args)
    addr, client = _client(args)
    with client:
        run_id = client.start(name, cfg) if cfg is not None else client.resume(name)
        verb = "resumed" if cfg is None else "started"
        print(
            f"fedlora run: {verb} run {name} as Flower run {run_id} on {addr.service}", flush=True
        )
        if args.no_wait:
            return 0
        run = client.follow(run_id, sys.stdout, verbose=args.verbose)
    if run.sub_status == COMPLETED:
        print(
            f"fedlora run: run {run_id} completed; artefacts in the coordinator's runs/{name}/",
            flush=True,
        )
        return 0
    raise FedloraError(
        f"run {run_id} ({name}) ended {run.sub_status}: {run.details or 'no details'}"
    )


def list_runs(args: argparse.Namespace) -> int:
    _, client = _client(args)
    with client:
        runs = client.list()
    if args.json:
        rows = [
            {
                "run_id": r.run_id,
                "name": r.name,
                "status": r.status,
                "sub_status": r.sub_status,
                "details": r.details,
                "resumed": r.resumed,
            }
            for r in runs
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not runs:
        print("no runs")
        return 0
    print(f"{'RUN ID':>20}  {'NAME':<24} STATUS")
    for r in runs:
        status = f"{r.status}:{r.sub_status}" if r.sub_status else r.status
        extra = " (resumed)" if r.resumed else ""
        print(f"{r.run_id:>20}  {r.name or '-':<24} {status}{extra}")
    return 0


def stop_run(args: argparse.Namespace) -> int:
    _, client = _client(args)
    with client:
        stopped = client.stop(args.run_id)
    print(f"fedlora runs: run {args.run_id} {'stopped' if stopped else 'had already finished'}")
    return 0
