"""`flwr run .` drives the same apps as `fedlora simulate` (pyproject.toml's Flower app).

It starts a real local SuperLink as a detached process, which outlives the run;
the test stops every process it started (found by its private FLWR_HOME).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _stop_processes_under(marker: str) -> None:
    victims = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                victims.extend([proc, *proc.children(recursive=True)])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(victims, timeout=10)
    for proc in alive:
        proc.kill()


def test_flwr_run_dot_runs_a_secagg_round(tmp_path):
    bindir = Path(sys.executable).parent
    if shutil.which("flwr", path=str(bindir)) is None:
        pytest.skip(f"no flwr executable next to {sys.executable}")
    config = tmp_path / "small.json"
    config.write_text(
        json.dumps({"training": {"rounds": 1, "local_steps": 2}, "export": {"enabled": False}})
    )
    run_dir = tmp_path / "run"
    flwr_home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    run_config = f'fedlora-config="{config}" run-dir="{run_dir}"'
    try:
        proc = subprocess.run(
            [str(bindir / "flwr"), "run", ".", "--stream", "--run-config", run_config],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=420,
        )
    finally:
        _stop_processes_under(str(flwr_home))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["secagg"] is True and rows[1]["num_devices"] == 10
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    report = json.loads((run_dir / "privacy" / "report.json").read_text())
    assert report["fleet"]["max_epsilon"] <= 8.0
    leftovers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if any(str(flwr_home) in part for part in (p.info["cmdline"] or []))
    ]
    assert leftovers == []
