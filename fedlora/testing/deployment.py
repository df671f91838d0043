"""A whole deployment on one machine: coordinator and devices as real processes.

What the end-to-end tests and ``bench/deployment.py`` start: ``fedlora keys``
for the PKI and device keys, ``fedlora coordinator`` and one ``fedlora device``
per device, each a separate process group on 127.0.0.1, talking gRPC with TLS.
Each device can be routed through a :class:`ByteCounter`, a TCP relay that
counts what crosses the wire (TLS records included) in each direction.

``stop`` kills every process group the harness started; ``orphans`` finds any
process that still mentions the deployment's directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

FEDLORA = [sys.executable, "-m", "fedlora.cli"]


def free_base_port(span: int = 3) -> int:
    """A port P with P .. P+span-1 all free on 127.0.0.1 (the coordinator uses three)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + span > 65000:
            continue
        ok = True
        for p in range(base, base + span):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError(f"no {span} consecutive free ports on 127.0.0.1")


class ByteCounter:
    """A TCP relay from ``listen`` to ``upstream`` counting bytes each way.

    ``up`` counts client → upstream (what a device sends), ``down`` the reverse.
    """

    def __init__(self, listen_port: int, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.upstream = (host, upstream_port)
        self.up = 0
        self.down = 0
        self._lock = threading.Lock()
        self._server = socket.create_server((host, listen_port), reuse_port=False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self._server.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                other = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                conn.close()
                continue
            other.settimeout(None)
            for src, dst, way in ((conn, other, "up"), (other, conn, "down")):
                threading.Thread(target=self._pipe, args=(src, dst, way), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
                with self._lock:
                    if way == "up":
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._server.close()


class LocalDeployment:
    """PKI, keys, data, a coordinator and devices under ``root``, as separate processes."""

    def __init__(self, root: Path, num_devices: int = 3) -> None:
        self.root = root
        self.num_devices = num_devices
        self.dir = root / "coordinator"
        self.keys = root / "keys"
        self.data = root / "data"
        self.port = free_base_port()
        #: ``fedlora coordinator --host``: "0.0.0.0" listens on every interface, as a
        #: coordinator reached by devices on other machines does.
        self.host = "127.0.0.1"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.counters: dict[int, list[ByteCounter]] = {}
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }

    # ------------------------------------------------------------ setup
    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.dir / "tls" / "ca.crt"

    @property
    def operator_key(self) -> Path:
        return self.dir / "tls" / "operator.key"

    def state(self, i: int) -> Path:
        return self.root / f"device-{i}-state"

    def prepare(self, extra_keys: tuple[str, ...] = ()) -> None:
        """PKI, a registered key per device (plus unregistered ``extra_keys``), demo data."""
        self.cli_ok("keys", "init", "--data-dir", str(self.dir))
        for i in range(self.num_devices):
            self.cli_ok("keys", "device", "--out", str(self.keys), "--device-id", f"device-{i}")
            self.cli_ok(
                "keys",
                "register",
                "--data-dir",
                str(self.dir),
                "--device-id",
                f"device-{i}",
                "--public-key",
                str(self.keys / f"device-{i}.pub"),
            )
        for name in extra_keys:
            self.cli_ok("keys", "device", "--out", str(self.keys), "--device-id", name)
        self.cli_ok("demo-data", "--out", str(self.data), "--devices", str(self.num_devices))

    # ------------------------------------------------------------ processes
    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*FEDLORA, *args], capture_output=True, text=True, env=self.env, timeout=timeout
        )

    def cli_ok(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        res = self.cli(*args, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"fedlora {' '.join(args)} failed: {res.stderr.strip()}")
        return res

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.root / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [*FEDLORA, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # its own process group: stop() takes all of it
            )
        self.procs[name] = proc
        return proc

    def start_coordinator(self, timeout_s: float = 90) -> None:
        info = self.dir / "coordinator.json"
        info.unlink(missing_ok=True)
        self.spawn(
            "coordinator",
            "coordinator",
            "--data-dir",
            str(self.dir),
            "--host",
            self.host,
            "--port",
            str(self.port),
        )
        deadline = time.monotonic() + timeout_s
        while not info.exists():
            if self.procs["coordinator"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the coordinator did not start: {self.log('coordinator')}")
            time.sleep(0.3)

    def start_device(self, i: int, *extra: str, count_bytes: bool = False) -> None:
        """Start device ``i``; with ``count_bytes`` its traffic goes through ByteCounters."""
        coordinator = self.addr
        if count_bytes:
            base = free_base_port()
            self.counters[i] = [
                ByteCounter(base, self.port),  # Fleet API
                ByteCounter(base + 2, self.port + 2),  # fedlora services
            ]
            coordinator = f"127.0.0.1:{base}"
        self.spawn(
            f"device-{i}",
            "device",
            "--coordinator",
            coordinator,
            "--data",
            str(self.data / f"device-{i}.jsonl"),
            "--key",
            str(self.keys / f"device-{i}.key"),
            "--root-cert",
            str(self.ca),
            "--state-dir",
            str(self.state(i)),
            *extra,
        )

    def start(self, *device_args: str, count_bytes: bool = False) -> None:
        self.start_coordinator()
        for i in range(self.num_devices):
            self.start_device(i, *device_args, count_bytes=count_bytes)

    def bytes_on_wire(self, i: int) -> tuple[int, int]:
        """(up, down) bytes device ``i`` has exchanged with the coordinator so far."""
        ups, downs = zip(*(c.snapshot() for c in self.counters[i]), strict=True)
        return sum(ups), sum(downs)

    def run(
        self, name: str, config: dict[str, Any], wait: bool = True, timeout: float = 900
    ) -> subprocess.CompletedProcess[str]:
        path = self.root / f"{name}.json"
        path.write_text(json.dumps(config))
        args = ["run", "--coordinator", self.addr, "--root-cert", str(self.ca)]
        args += ["--key", str(self.operator_key), "--config", str(path), "--name", name]
        if not wait:
            args.append("--no-wait")
        return self.cli(*args, timeout=timeout)

    def resume(self, name: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """``fedlora run --resume NAME``, waiting for the run to end."""
        args = ["run", "--coordinator", self.addr, "--root-cert", str(self.ca)]
        args += ["--key", str(self.operator_key), "--resume", name]
        return self.cli(*args, timeout=timeout)

    def run_dir(self, name: str) -> Path:
        return self.dir / "runs" / name

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)
        for counters in self.counters.values():
            for c in counters:
                c.close()

    def orphans(self) -> list[str]:
        """Live processes whose command line mentions this deployment's directory."""
        return processes_mentioning(str(self.root))

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def listening_tcp() -> set[tuple[str, int]]:
    """``(address, port)`` of every listening TCP socket on this machine.

    Read from /proc/net/tcp and /proc/net/tcp6; an IPv6 address is written the
    ``ipaddress`` way, so a dual-stack wildcard listener (what gRPC makes of
    ``0.0.0.0:P``) shows as ``("::", P)``.
    """
    import ipaddress

    found = set()
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            ip_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(ip_hex)
            # the kernel prints each 32-bit word in host (little-endian) order
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((str(ipaddress.ip_address(packed)), int(port_hex, 16)))
    return found


#: How a listener on every interface shows in :func:`listening_tcp`.
EVERY_INTERFACE = frozenset({"0.0.0.0", "::"})


def processes_mentioning(text: str) -> list[str]:
    """``"pid: cmdline"`` of every live process whose command line or environment has ``text``.

    The environment matters: Flower's app processes carry no path of the
    deployment in their arguments, but inherit ``FEDLORA_RUNS_DIR`` and friends.
    """
    found = []
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            env = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (needle in cmd or needle in env):
            shown = cmd.replace(b"\0", b" ").decode(errors="replace")[:200]
            found.append(f"{entry.name}: {shown}")
    return found
