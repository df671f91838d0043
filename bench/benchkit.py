"""What every benchmark under ``bench/`` shares: fresh-process runs, RSS sampling, JSON out.

A simulated run is a ``fedlora simulate`` child process (:func:`simulate_child`),
so every variant starts from cold caches and its memory is its own: the peak
resident set of the child's whole process tree (the driver, Ray's GCS, raylet
and every worker) is sampled with psutil while it runs (:class:`TreeRss`).

Benchmarks print exactly one JSON object on stdout (:func:`emit`); everything
the libraries and child processes print goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FEDLORA = Path(sys.executable).with_name("fedlora")

#: Per-round metrics the per-round timing/bytes work adds to ``metrics.jsonl`` rows; the
#: benches use them when a row has them and fall back to their own measurement otherwise.
ROUND_TIMING_KEYS = ("train_s_total", "train_s_max", "framework_s")
ROUND_BYTES_KEYS = ("bytes_down", "bytes_up", "bytes_up_per_device", "bytes_down_per_device")


def setup_env() -> None:
    """The environment every bench and its children run in (cache, threads, no installs)."""
    os.environ.setdefault("FEDLORA_CACHE", "/tmp/fc")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send fd 1 (ours and any child process's) to stderr, so stdout carries only the JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def emit(result: dict[str, Any]) -> None:
    """The bench's one JSON object, on stdout."""
    print(json.dumps(result, indent=2, ensure_ascii=False), flush=True)


def machine() -> dict[str, Any]:
    """Where and when: cpus, memory, load (other work on the machine skews timings)."""
    import psutil

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "loadavg_at_end": [round(x, 2) for x in load],
    }


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ memory


@dataclass
class TreeRss:
    """Peak summed RSS of a process and all its descendants, sampled every ``interval`` s.

    RSS counts shared pages once per process (libtorch mapped by every Ray worker
    counts in each), which is what the machine's memory pressure looks like to a
    user watching ``top``; ``peak_uss`` (unique set size, pages private to each
    process) is sampled alongside when the platform has it, at a lower rate.
    """

    pid: int
    interval: float = 0.5
    peak_rss: int = 0
    peak_uss: int = 0
    peak_processes: int = 0
    samples: int = 0
    series: list[tuple[float, int]] = field(default_factory=list)
    _t0: float = field(default_factory=time.perf_counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> TreeRss:
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> TreeRss:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self

    def sample(self, with_uss: bool = False) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        rss = uss = 0
        for p in procs:
            try:
                if with_uss:
                    info = p.memory_full_info()
                    uss += info.uss
                    rss += info.rss
                else:
                    rss += p.memory_info().rss
            except psutil.Error:
                continue  # a process that just ended
        self.samples += 1
        self.peak_rss = max(self.peak_rss, rss)
        if with_uss:
            self.peak_uss = max(self.peak_uss, uss)
        self.peak_processes = max(self.peak_processes, len(procs))
        self.series.append((round(time.perf_counter() - self._t0, 1), rss))
        return rss

    def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            self.sample(with_uss=n % 10 == 0)
            n += 1
            self._stop.wait(self.interval)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "peak_rss_bytes": self.peak_rss,
            "peak_rss_mib": round(self.peak_rss / 2**20, 1),
            "peak_processes": self.peak_processes,
            "samples": self.samples,
            "interval_s": self.interval,
        }
        if self.peak_uss:
            out["peak_uss_mib"] = round(self.peak_uss / 2**20, 1)
        return out


# ------------------------------------------------------------------ simulated runs


#: SecAgg+/reply waits for benches: an hour, not the default 300 s. A bench measures what a
#: round costs; on a loaded machine a round past the default wait loses devices (or all of
#: them), and its time is then the timeout, not the work.
BENCH_TIMEOUT_S = 3600.0


def config_dict(**sections: Any) -> dict[str, Any]:
    """A resolved fedlora config (defaults + ``sections``) as the JSON the CLI reads."""
    from fedlora.config import FedloraConfig

    secagg = {"timeout_s": BENCH_TIMEOUT_S, **sections.pop("secagg", {})}
    return FedloraConfig().replace(secagg=secagg, **sections).to_dict()


def incomplete_rounds(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Rounds ≥ 1 that did not aggregate every sampled device (timeouts, dropouts, failures)."""
    return [
        r["round"]
        for r in rows
        if r["round"] >= 1 and (r["num_devices"] < r.get("sampled", r["num_devices"]))
    ]


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class ChildRun:
    run_dir: Path
    wall_s: float
    rows: list[dict[str, Any]]
    memory: dict[str, Any]
    summary: dict[str, Any]

    def training_rows(self, skip_first: int = 0) -> list[dict[str, Any]]:
        """Rows of rounds ≥ 1 (round 0 is the coordinator's evaluation before training)."""
        return [r for r in self.rows if r["round"] >= 1 + skip_first]


def simulate_child(
    config: dict[str, Any],
    run_dir: Path,
    *,
    rss_interval: float = 0.5,
    timeout: float = 3600,
    flags: tuple[str, ...] = (),
) -> ChildRun:
    """Run ``fedlora simulate`` on ``config`` (and ``flags``) in a fresh process; sample its
    tree's RSS."""
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg_file = run_dir.parent / f"{run_dir.name}.config.json"
    cfg_file.write_text(json.dumps(config, indent=2))
    cmd = [str(FEDLORA), "simulate", "--config", str(cfg_file), "--out", str(run_dir)]
    cmd += ["--force", "--quiet", *flags]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr, cwd=REPO)
    rss = TreeRss(proc.pid, interval=rss_interval).start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{' '.join(cmd)} ran past {timeout:.0f} s") from None
    finally:
        rss.stop()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}; see stderr")
    status = json.loads((run_dir / "run.json").read_text())
    return ChildRun(
        run_dir=run_dir,
        wall_s=wall,
        rows=read_rows(run_dir),
        memory=rss.as_dict(),
        summary=status.get("summary", {}),
    )


def finished_run(run_dir: Path) -> ChildRun | None:
    """A run made earlier, if it completed (wall time from run.json; no memory samples)."""
    try:
        status = json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if status.get("status") != "complete":
        return None
    return ChildRun(
        run_dir=Path(run_dir),
        wall_s=float(status["finished"] - status["started"]),
        rows=read_rows(Path(run_dir)),
        memory={"peak_rss_mib": None},
        summary=status.get("summary", {}),
    )


def alternate(names: Sequence[str], reps: int) -> list[str]:
    """ABBA order: ``reps`` runs of each name, the order reversed every repetition."""
    order: list[str] = []
    for rep in range(reps):
        order.extend(names if rep % 2 == 0 else list(reversed(names)))
    return order


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def rnd(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(float(x), digits)
