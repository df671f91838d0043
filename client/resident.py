"""A device's resident task runner: every ClientApp task of a SuperNode, in one process.

Flower 1.39's SuperNode runs each message as a task, and its executor starts a fresh
``flwr-clientapp`` process for every task: SecAgg+ sends four per device per round,
and each new process imports torch, reads the device's data and loads the base model
before it does the device's own work. ``fedlora device`` instead hands its tasks (their
Runtime API tokens) to this one long-lived process, which runs them one after another
the way ``flwr-clientapp`` runs one: pull the task's message, Context and app bundle,
check the bundle, run the ClientApp, push the reply and the updated Context. What
:mod:`fedlora.runtime` caches per process (model, LoRA wrapper, encoded data) stays
loaded from one task to the next, so a task costs the device's own work; the model's
build starts in the background with the device's first task, discovery's
(:func:`fedlora.runtime.warm_up`).

What it keeps from a fresh process per task:

- **The bundle guard.** Each task's bundle must be fedlora's own code-free bundle
  (:func:`fedlora.appguard.check_fab`); the ClientApp that runs is the installed one it
  names (:data:`fedlora.appguard.COMPONENTS`), never anything from the bundle, and a
  foreign bundle is refused, with one line in ``clientapp.log``, as the task's error.
- **No state between tasks but caches**, and those of one run at a time
  (:class:`RunCaches`). Everything a task may change travels in its Context (SecAgg+'s
  per-round secrets, the node state) and is pushed back with the task; the device's
  ledger is a file it reads and writes per round.
- **One task at a time**, in the order the SuperNode handed them out: a device's SecAgg+
  stages and ledger queries never race for its state.

A task that raises is answered with an error reply, as Flower's ``flwr-clientapp`` does,
and the runner goes on. A SuperNode whose Runtime API stops answering costs a task at
most :data:`API_GIVE_UP_S` per call (Flower's own client retries forever, which in a
process per task stalls one task but here would stall every later task of the device):
the task is given up as failed and the runner takes the next token. A runner that dies
(a crash in native code) is started again by the executor
(:func:`fedlora.appguard.serve_tasks`), and the task it was running is lost like a
device going offline for one message.

    python -m fedlora.client.resident --runtime-api-address HOST:PORT
        (--insecure | --root-certificates CA) [--parent-pid PID]   < one token per line
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fedlora.appguard import COMPONENTS, ForeignAppError, check_fab, fab_digest


class RunCaches:
    """What the runner keeps loaded belongs to one run at a time: when a task of another
    run arrives, :func:`fedlora.runtime.clear` drops the previous run's models and data
    first, so a device that serves run after run (each with its own model or LoRA
    settings) holds one run's caches, not every run's it ever saw."""

    def __init__(self, clear: Any = None) -> None:
        self._clear = clear
        self.run_id: int | None = None
        #: How many times the caches were dropped for a new run.
        self.cleared = 0

    def enter(self, run_id: int) -> None:
        if self.run_id is not None and run_id != self.run_id:
            if self._clear is None:
                from fedlora import runtime

                self._clear = runtime.clear
            self._clear()
            self.cleared += 1
        self.run_id = run_id


_caches = RunCaches()

API_GIVE_UP_S = 30.0
"""How long one call to the SuperNode's Runtime API (pull the task, push the reply, push
the task's status) keeps retrying before the task is given up."""


def installed_client_app() -> Any:
    """The ClientApp fedlora's bundle names (``fedlora.client.app:app``), imported once."""
    module, _, attr = COMPONENTS["clientapp"].partition(":")
    return getattr(importlib.import_module(module), attr)


def run_task(
    runtime_api_address: str,
    token: str,
    root_cert: bytes | None,
    give_up_s: float = API_GIVE_UP_S,
) -> str:
    """One ClientApp task, as ``flwr-clientapp --token TOKEN`` runs it; returns its
    sub-status (``completed`` or ``failed``). Each Runtime API call retries for at most
    ``give_up_s`` seconds; a task whose SuperNode stays unreachable ends ``failed``."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    retry = make_simple_http_retry_invoker()
    retry.max_time = give_up_s  # Flower's is None: retry for ever
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=root_cert is None,
        root_certificates=root_cert,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=retry,
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        heartbeat.start()
        message, context, _run, fab = pull_task_input(client)
        _caches.enter(context.run_id)
        try:
            check_fab(fab.content)
        except ForeignAppError as err:
            print(
                f"fedlora: refused the run's app bundle (sha256 {fab_digest(fab.content)}…): {err}",
                file=sys.stderr,
                flush=True,
            )
            raise
        reply = installed_client_app()(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # the task's failure, reported as flwr-clientapp reports it
        reason = f"{type(exc)}:<'{exc}'>"
        print(f"fedlora: ClientApp task failed: {reason}", file=sys.stderr, flush=True)
        details = reason
        if message is not None:
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                reply_to=message,
            )
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as exc:  # the SuperNode went away: nothing left to tell it
            print(f"fedlora: could not push the task's reply: {exc}", file=sys.stderr)
            status = SubStatus.FAILED
        try:
            push_task_output(client, context, status, details)
        except Exception as exc:  # likewise: the next token may find it back
            print(f"fedlora: could not push the task's status: {exc}", file=sys.stderr)
            status = SubStatus.FAILED
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    return str(status)


def serve(
    runtime_api_address: str,
    root_cert: bytes | None,
    tokens: Iterable[str],
    give_up_s: float = API_GIVE_UP_S,
) -> int:
    """Run the task of every token in ``tokens`` (until it ends); returns how many ran."""
    done = 0
    for line in tokens:
        token = line.strip()
        if not token:
            continue
        started = time.monotonic()
        status = run_task(runtime_api_address, token, root_cert, give_up_s)
        done += 1
        print(
            f"fedlora: task {done} {status} in {time.monotonic() - started:.2f}s",
            file=sys.stderr,
            flush=True,
        )
    return done


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fedlora.client.resident",
        description="Run the ClientApp tasks whose tokens arrive on stdin (one per line), one "
        "after another in this process, checking each run's app bundle first.",
    )
    parser.add_argument("--runtime-api-address", required=True)
    trust = parser.add_mutually_exclusive_group(required=True)
    trust.add_argument("--insecure", action="store_true")
    trust.add_argument("--root-certificates", type=Path)
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)  # end with the executor's process
    root = None if args.insecure else args.root_certificates.read_bytes()
    from fedlora import runtime

    runtime.stay_warm()  # the first task (discovery) starts the model's build
    serve(args.runtime_api_address, root, sys.stdin)


if __name__ == "__main__":
    main()
