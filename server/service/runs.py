"""RunService: the operator starts, resumes, stops, lists and follows runs, with the operator key.

The SuperLink's Control API (what ``flwr run`` talks to) has no authentication,
and Flower runs whatever app a run's bundle names. So the coordinator keeps it
on loopback (:data:`fedlora.server.control.CONTROL_HOST`) and this service is the only
way in from the network: every call is signed (the interceptor in
:mod:`fedlora.server.service.auth` has verified it before a method here runs) and
every method refuses callers other than the operator. The run's bundle is
built here (:func:`fedlora.server.control.build_fab`: the installed apps, no code), so
a caller chooses a run's *config*, never its code. Each start, resume and stop
is appended to ``DIR/audit.jsonl`` with the key that signed it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from fedlora.auditlog import append_event, read_events
from fedlora.config import FedloraConfig
from fedlora.errors import ConfigError, FedloraError
from fedlora.keys import key_fingerprint, load_public_key, operator_key_files
from fedlora.server.control import build_fab, control_client, describe_control_error
from fedlora.server.service.auth import Caller
from fedlora.server.service.status import abort
from fedlora.v1 import run_service_pb2 as pb

log = logging.getLogger("fedlora.runs")

#: A run name: its directory under DIR/runs/.
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FINISHED = "finished"
#: How often FollowRun re-opens Flower's log stream (it ends when a run does, or drops).
FOLLOW_POLL_S = 1.0


class RunServicer:
    """Runs on the SuperLink at ``control`` (loopback), for the operator only."""

    def __init__(self, data_dir: str | Path, control: str, root_cert: Path | None) -> None:
        self.data_dir = Path(data_dir)
        self.control = control
        self.root_cert = root_cert

    # ------------------------------------------------------------ helpers
    def _operator(self, context: grpc.ServicerContext, caller: Caller) -> str:
        """The audit log's actor for an operator call; any other caller is refused."""
        if not caller.operator:
            abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "runs are started and stopped with the operator key (DIR/tls/operator.key); "
                f"{caller.id} is a device",
            )
        try:
            fingerprint = key_fingerprint(load_public_key(operator_key_files(self.data_dir)[1]))
        except ConfigError:
            fingerprint = "unreadable"
        return f"{caller.id} (key {fingerprint})"

    def _audit_ready(self, context: grpc.ServicerContext) -> None:
        """Refuse to act when the audit log could not record it (fail closed)."""
        try:
            read_events(self.data_dir)
        except (ConfigError, OSError) as err:
            abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"coordinator: the audit log cannot record this, so nothing was done: {err}",
            )

    def _audit(
        self, context: grpc.ServicerContext, action: str, actor: str, run_id: int, **details: Any
    ) -> None:
        """Record an action that happened; if that fails, undo a start and say so."""
        try:
            append_event(self.data_dir, action, actor, run_id=run_id, **details)
        except (ConfigError, OSError) as err:
            if action != "run.stop":
                self._stop_quietly(run_id)
            abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"coordinator: the audit log could not record {action} of run {run_id} "
                f"({err}); the run was stopped",
            )

    def _stop_quietly(self, run_id: int) -> None:
        from flwr.proto.control_pb2 import StopRunRequest

        try:
            with self._client() as client:
                client.StopRun(StopRunRequest(run_id=run_id))
        except Exception as exc:
            log.error("could not stop unaudited run %s: %s", run_id, describe_control_error(exc))

    def _client(self) -> Any:
        return control_client(self.control, self.root_cert, insecure=self.root_cert is None)

    def _start(
        self, context: grpc.ServicerContext, name: str, config_json: str, resume: bool
    ) -> int:
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        fab_bytes = build_fab()
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        overrides: dict[str, bool | float | int | str] = {
            "run-dir": name,
            "fedlora-config-json": config_json,
        }
        if resume:
            overrides["resume"] = "true"
        try:
            with self._client() as client:
                res = client.StartRun(
                    StartRunRequest(
                        fab=fab_to_proto(fab), override_config=user_config_to_proto(overrides)
                    )
                )
        except Exception as exc:
            abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the SuperLink refused the run: {describe_control_error(exc)}",
            )
        if not res.HasField("run_id"):
            abort(context, grpc.StatusCode.INTERNAL, "the SuperLink did not start the run")
        return int(res.run_id)

    def _start_audited(
        self,
        context: grpc.ServicerContext,
        actor: str,
        name: str,
        config_json: str,
        resume: bool,
    ) -> pb.StartRunResponse:
        """Start (or resume) the run and append it to the audit log with who signed it."""
        run_id = self._start(context, name, config_json, resume=resume)
        self._audit(
            context,
            "run.resume" if resume else "run.start",
            actor,
            run_id,
            run=name,
            config_sha256=hashlib.sha256(config_json.encode()).hexdigest(),
        )
        return pb.StartRunResponse(run_id=run_id, name=name)

    def _flower_runs(self, context: grpc.ServicerContext, run_id: int | None = None) -> Any:
        from flwr.proto.control_pb2 import ListRunsRequest

        try:
            with self._client() as client:
                req = ListRunsRequest() if run_id is None else ListRunsRequest(run_id=run_id)
                return client.ListRuns(req).run_dict
        except Exception as exc:
            abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"cannot list the SuperLink's runs: {describe_control_error(exc)}",
            )

    def _listed(self, context: grpc.ServicerContext) -> list[pb.Run]:
        runs = self._flower_runs(context)
        return [self._to_proto(i, runs[i]) for i in sorted(runs)]

    @staticmethod
    def _to_proto(run_id: int, run: Any) -> pb.Run:
        from flwr.common.serde import user_config_from_proto

        config = user_config_from_proto(run.override_config)
        return pb.Run(
            run_id=int(run_id),
            name=str(config.get("run-dir", "")),
            status=run.status.status,
            sub_status=run.status.sub_status,
            details=run.status.details,
            resumed=str(config.get("resume", "")).lower() == "true",
        )

    def _started_with(self, context: grpc.ServicerContext, name: str) -> str:
        """The config run ``name`` was first started with, from the SuperLink's run history
        (SQLite under DIR/state: it outlives a coordinator restart)."""
        from flwr.common.serde import user_config_from_proto

        runs = self._flower_runs(context)
        for run_id in sorted(runs):
            config = user_config_from_proto(runs[run_id].override_config)
            text = config.get("fedlora-config-json")
            if config.get("run-dir") == name and isinstance(text, str) and text:
                return text
        abort(
            context,
            grpc.StatusCode.NOT_FOUND,
            f"this coordinator has no run named {name!r} started by `fedlora run`: check the "
            "name (its directory under DIR/runs/)",
        )

    @staticmethod
    def _check_name(context: grpc.ServicerContext, name: str) -> None:
        if not RUN_NAME.match(name):
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"run name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
                "(a directory name)",
            )

    # ------------------------------------------------------------ RPCs
    def StartRun(
        self, request: pb.StartRunRequest, context: grpc.ServicerContext, caller: Caller
    ) -> pb.StartRunResponse:
        actor = self._operator(context, caller)
        self._check_name(context, request.name)
        try:
            cfg = FedloraConfig.from_dict(json.loads(request.config_json))
        except (ValueError, TypeError, FedloraError) as err:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"the run's config is invalid: {err}")
        if cfg.privacy.reproducible_noise:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "privacy.reproducible_noise is a simulation-only research option: devices "
                "refuse it, since whoever holds the seed could remove their noise",
            )
        config_json = json.dumps(cfg.to_dict())
        self._audit_ready(context)
        # A name is used once: a second start (a mistake, or a captured StartRun replayed
        # after a coordinator restart emptied the replay memory) is refused here.
        if (self.data_dir / "runs" / request.name).exists() or any(
            r.name == request.name for r in self._listed(context)
        ):
            abort(
                context,
                grpc.StatusCode.ALREADY_EXISTS,
                f"a run named {request.name!r} exists on this coordinator: pick another name, "
                f"or continue it with `fedlora run --resume {request.name}`",
            )
        return self._start_audited(context, actor, request.name, config_json, resume=False)

    def ResumeRun(
        self, request: pb.ResumeRunRequest, context: grpc.ServicerContext, caller: Caller
    ) -> pb.StartRunResponse:
        actor = self._operator(context, caller)
        self._check_name(context, request.name)
        # Devices read their config from the run config: the run's own, as first sent.
        config_json = self._started_with(context, request.name)
        self._audit_ready(context)
        return self._start_audited(context, actor, request.name, config_json, resume=True)

    def StopRun(
        self, request: pb.StopRunRequest, context: grpc.ServicerContext, caller: Caller
    ) -> pb.StopRunResponse:
        from flwr.proto.control_pb2 import StopRunRequest

        actor = self._operator(context, caller)
        runs = self._flower_runs(context)
        if request.run_id not in runs:
            abort(
                context, grpc.StatusCode.NOT_FOUND, f"no run {request.run_id} on this coordinator"
            )
        run = self._to_proto(request.run_id, runs[request.run_id])
        if run.status == FINISHED:
            return pb.StopRunResponse(stopped=False)
        self._audit_ready(context)
        try:
            with self._client() as client:
                res = client.StopRun(StopRunRequest(run_id=request.run_id))
        except Exception as exc:
            abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the SuperLink did not stop run {request.run_id}: {describe_control_error(exc)}",
            )
        self._audit(context, "run.stop", actor, int(request.run_id), run=run.name)
        return pb.StopRunResponse(stopped=bool(res.success))

    def ListRuns(
        self, request: pb.ListRunsRequest, context: grpc.ServicerContext, caller: Caller
    ) -> pb.ListRunsResponse:
        self._operator(context, caller)
        return pb.ListRunsResponse(runs=self._listed(context))

    def FollowRun(
        self, request: pb.FollowRunRequest, context: grpc.ServicerContext, caller: Caller
    ) -> Iterator[pb.FollowRunResponse]:
        from flwr.proto.control_pb2 import StreamLogsRequest

        self._operator(context, caller)
        if request.run_id not in self._flower_runs(context, request.run_id):
            abort(
                context, grpc.StatusCode.NOT_FOUND, f"no run {request.run_id} on this coordinator"
            )
        after = request.after_timestamp
        while context.is_active():
            try:
                with self._client() as client:
                    for res in client.StreamLogs(
                        StreamLogsRequest(run_id=request.run_id, after_timestamp=after)
                    ):
                        after = max(after, res.latest_timestamp)
                        if res.log_output:
                            yield pb.FollowRunResponse(
                                log_output=res.log_output, latest_timestamp=after
                            )
            except Exception:  # Flower's stream ends when the run does, or drops: check below
                pass
            runs = self._flower_runs(context, request.run_id)
            run = self._to_proto(request.run_id, runs[request.run_id])
            if run.status == FINISHED:
                yield pb.FollowRunResponse(latest_timestamp=after, finished=run)
                return
            time.sleep(FOLLOW_POLL_S)
