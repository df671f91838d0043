"""Only fedlora's own installed apps run here: Flower's task executor, with a guard.

Flower runs whatever a run's Flower App Bundle (FAB) names: the SuperLink's
executor starts ``flwr-serverapp`` and a SuperNode's starts ``flwr-clientapp``,
each of which unpacks the run's FAB into ``FLWR_HOME/apps/`` and imports the
component its ``pyproject.toml`` names, with the bundle's directory first on
``sys.path``. Whoever can start a run (the Control API; for a device, the
coordinator) can therefore run code on the coordinator and on every device.

fedlora's own bundle carries no code (:func:`fedlora.cli.run.app_pyproject`): a
``pyproject.toml`` that names the apps installed with fedlora. So fedlora runs
the SuperLink and the SuperNodes with ``--isolation process`` and is itself the
executor (:func:`serve_tasks`): it takes each task from the Runtime API and
starts ``python -m fedlora.appguard KIND ...``, which is Flower's own
``flwr-clientapp`` / ``flwr-serverapp`` with one change: before the bundle is
unpacked, :func:`check_fab` reads it and refuses anything but fedlora's
code-free bundle. The refusal raises inside Flower's task, so Flower reports it
the way it reports any failed task: to the ServerApp as an error reply (a
device), or as the run's failure (the coordinator). Nothing in a refused bundle
is written to disk or imported.

Flower's own check (``flower-supernode --trusted-entities``) verifies Ed25519
signatures that only the Flower Hub attaches; a bundle submitted to a
self-hosted SuperLink never carries one, so it would refuse fedlora's runs too.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import logging
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import tomllib

from fedlora.errors import FedloraError

log = logging.getLogger("fedlora.appguard")

#: The components fedlora's bundle names: the apps installed with fedlora, nothing else.
COMPONENTS = {"serverapp": "fedlora.server.app:app", "clientapp": "fedlora.client.app:app"}
PUBLISHER = "fedlora"
#: What fedlora's bundle holds: its pyproject.toml and Flower's manifest of it.
ALLOWED_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})
KINDS = ("clientapp", "serverapp")
#: How often the executor asks the Runtime API for a new task (Flower's SuperExec: 1 s).
POLL_S = 0.2


class ForeignAppError(FedloraError):
    """A run's app bundle is not fedlora's own: it is refused before anything in it runs."""


def check_fab(content: bytes) -> None:
    """Refuse (:class:`ForeignAppError`) any bundle but fedlora's code-free one.

    fedlora's bundle is exactly ``pyproject.toml`` (publisher ``fedlora``, no
    dependencies, components :data:`COMPONENTS`) plus Flower's ``.info/CONTENT``.
    Any other file (code, a data file, a directory entry), another component, a
    dependency to install or an unreadable archive is refused.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
        names = archive.namelist()
    except (zipfile.BadZipFile, ValueError) as err:
        raise ForeignAppError(f"the app bundle is not a readable archive ({err})") from None
    if len(names) != len(set(names)):
        raise ForeignAppError("the app bundle lists a file twice")
    extra = sorted(set(names) - ALLOWED_FILES)
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise ForeignAppError(
            f"the app bundle carries files fedlora's never does ({shown}): only the apps "
            "installed with fedlora run here"
        )
    if "pyproject.toml" not in names:
        raise ForeignAppError("the app bundle has no pyproject.toml")
    try:
        project = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ForeignAppError(f"the app bundle's pyproject.toml is unreadable ({err})") from None
    app = project.get("tool", {}).get("flwr", {}).get("app", {})
    components = app.get("components")
    if components != COMPONENTS:
        raise ForeignAppError(
            f"the app bundle names components {components!r}; fedlora runs only "
            f"{COMPONENTS!r}, installed with it"
        )
    if app.get("publisher") != PUBLISHER:
        raise ForeignAppError(
            f"the app bundle's publisher is {app.get('publisher')!r}, not fedlora"
        )
    deps = project.get("project", {}).get("dependencies", [])
    if deps:
        raise ForeignAppError(f"the app bundle asks to install {deps!r}; fedlora's asks for none")


def fab_digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()[:16]


def _guard(module: Any) -> None:
    """Put :func:`check_fab` in front of the ``install_from_fab`` a Flower task module calls."""
    original = module.install_from_fab

    def install_checked(fab_file: Path | bytes, *args: Any, **kwargs: Any) -> Any:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        try:
            check_fab(content)
        except ForeignAppError as err:
            print(
                f"fedlora: refused the run's app bundle (sha256 {fab_digest(content)}…): {err}",
                file=sys.stderr,
                flush=True,
            )
            raise
        return original(fab_file, *args, **kwargs)

    module.install_from_fab = install_checked


def run_task(kind: str, argv: Sequence[str]) -> None:
    """One task, as Flower's ``flwr-KIND`` would run it, with the bundle checked first.

    ``argv`` are ``flwr-KIND``'s arguments (``--runtime-api-address``, ``--token``, ...).
    """
    if kind == "clientapp":
        module = importlib.import_module("flwr.supernode.runtime.run_clientapp")
        from flwr.supernode.cli.flwr_clientapp import flwr_clientapp as entry
    elif kind == "serverapp":
        module = importlib.import_module("flwr.superlink.runtime.run_serverapp")
        from flwr.superlink.cli.flwr_serverapp import flwr_serverapp as entry
    else:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    _guard(module)
    sys.argv = [f"flwr-{kind}", *argv]
    entry()


def task_command(
    kind: str, runtime_api_address: str, token: str, root_cert: Path | None
) -> list[str]:
    """The command line of one guarded task process (what Flower's executor would start)."""
    cmd = [
        sys.executable,
        "-m",
        "fedlora.appguard",
        kind,
        "--runtime-api-address",
        runtime_api_address,
        "--token",
        token,
        "--parent-pid",
        str(os.getpid()),
    ]
    cmd += ["--insecure"] if root_cert is None else ["--root-certificates", str(root_cert)]
    return cmd


def resident_command(runtime_api_address: str, root_cert: Path | None) -> list[str]:
    """The command line of a device's resident task runner (:mod:`fedlora.client.resident`)."""
    cmd = [
        sys.executable,
        "-m",
        "fedlora.client.resident",
        "--runtime-api-address",
        runtime_api_address,
        "--parent-pid",
        str(os.getpid()),
    ]
    cmd += ["--insecure"] if root_cert is None else ["--root-certificates", str(root_cert)]
    return cmd


class ResidentRunner:
    """One long-lived process that runs every task handed to it, one after another.

    Tokens go to its stdin, one per line; a runner that has died (a crash in native code)
    is started again for the next token. Its output goes where task processes' would.
    """

    def __init__(
        self,
        runtime_api_address: str,
        root_cert: Path | None,
        *,
        output: IO[bytes] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.command = resident_command(runtime_api_address, root_cert)
        self.output = output
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        #: How many times a runner process was started.
        self.starts = 0

    def submit(self, token: str) -> None:
        for _ in range(2):  # a runner found dead (broken pipe) is replaced once
            if self.proc is None or self.proc.poll() is not None:
                if self.proc is not None:
                    log.warning(
                        "resident task runner exited (%s); starting another", self.proc.returncode
                    )
                self.proc = subprocess.Popen(
                    self.command,
                    stdin=subprocess.PIPE,
                    stdout=self.output,
                    stderr=subprocess.STDOUT if self.output is not None else None,
                    env=self.env,
                )
                self.starts += 1
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(token.encode() + b"\n")
                self.proc.stdin.flush()
                return
            except BrokenPipeError:
                self.proc.wait()

    def close(self, grace_s: float = 5.0) -> None:
        """End the runner: it gets ``grace_s`` to finish what it was handed (end of its
        input), then SIGTERM, then SIGKILL."""
        proc = self.proc
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        for stop in (None, proc.terminate, proc.kill):
            if stop is not None:
                stop()
            try:
                proc.wait(timeout=grace_s if stop is None else 10)
                return
            except subprocess.TimeoutExpired:
                continue


def serve_tasks(
    kind: str,
    runtime_api_address: str,
    root_cert: Path | None,
    stop: threading.Event,
    *,
    output: IO[bytes] | None = None,
    env: dict[str, str] | None = None,
    poll_s: float = POLL_S,
    resident: bool = False,
) -> None:
    """Take ``kind`` tasks from a Runtime API and run each in a guarded process, until ``stop``.

    This is the executor a SuperLink or SuperNode started with ``--isolation
    process`` waits for; fedlora's coordinator and device run it in a thread.
    Task processes write to ``output`` (default: inherited) and are reaped here.
    ``resident`` (ClientApp tasks only): every task runs in one long-lived
    :class:`ResidentRunner` instead of a process of its own.
    """
    if resident and kind != "clientapp":
        raise ValueError("only ClientApp tasks run in a resident process")
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    task_type = TaskType.CLIENT_APP if kind == "clientapp" else TaskType.SERVER_APP
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=root_cert is None,
        root_certificates=root_cert.read_bytes() if root_cert is not None else None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    running: list[subprocess.Popen[bytes]] = []
    runner = ResidentRunner(runtime_api_address, root_cert, output=output, env=env)
    try:
        while not stop.is_set():
            running = [p for p in running if p.poll() is None]
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[task_type]))
            except Exception as exc:  # the API is starting or restarting: ask again
                log.debug("AcquireTask failed: %s", exc)
                stop.wait(1.0)
                continue
            if res.HasField("task") and res.token and resident:
                runner.submit(res.token)
                continue
            if res.HasField("task") and res.token:
                cmd = task_command(kind, runtime_api_address, res.token, root_cert)
                running.append(
                    subprocess.Popen(
                        cmd,
                        stdout=output,
                        stderr=subprocess.STDOUT if output is not None else None,
                        env=env,
                        # No preexec_fn: it would fork a process whose gRPC threads are
                        # running; the task ends with us through --parent-pid instead.
                    )
                )
                continue  # another task may be waiting
            stop.wait(poll_s)
    finally:
        client.close()
        runner.close()
        for proc in running:
            if proc.poll() is None:
                proc.terminate()
        for proc in running:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_executor(
    kind: str,
    runtime_api_address: str,
    root_cert: Path | None,
    *,
    output: IO[bytes] | None = None,
    env: dict[str, str] | None = None,
    resident: bool = False,
) -> tuple[threading.Thread, threading.Event]:
    """:func:`serve_tasks` in a daemon thread; set the returned event to stop it."""
    stop = threading.Event()
    thread = threading.Thread(
        target=serve_tasks,
        args=(kind, runtime_api_address, root_cert, stop),
        kwargs={"output": output, "env": env, "resident": resident},
        name=f"fedlora-{kind}-executor",
        daemon=True,
    )
    thread.start()
    return thread, stop


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m fedlora.appguard",
        description="Run one Flower task (started by fedlora's executor) after checking that "
        "the run's app bundle is fedlora's own.",
    )
    parser.add_argument("kind", choices=KINDS)
    known, rest = parser.parse_known_args(args)
    run_task(known.kind, rest)


if __name__ == "__main__":
    # Run from the imported module, not this __main__ copy, so the refusal Flower reports
    # names fedlora.appguard.ForeignAppError.
    from fedlora.appguard import main as _main

    _main()
