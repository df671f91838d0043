"""A compromised coordinator cannot make a device run code: real processes on 127.0.0.1.

The "coordinator" here is the attacker's: a plain Flower SuperLink (no fedlora,
no guard) running a bundle of the attacker's own. A real ``fedlora device``
connects to it. The bundle names fedlora's own components and carries
``fedlora/client/app.py`` and ``fedlora/server/app.py`` that would shadow the installed ones;
importing either writes a marker file. The attacker's ServerApp runs (it is
the attacker's machine) and queries the device; the device must refuse the
bundle before anything in it is written or imported, say so in one log line,
and report the refusal back as the task's error reply.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from fedlora.testing.attacker import evil_fab, markers, submit_to_control_api
from fedlora.testing.deployment import free_base_port
from fedlora.watchdog import flower_executable, flower_path, stop_process

pytestmark = pytest.mark.slow


def test_device_refuses_a_compromised_coordinators_code(tmp_path):
    port = free_base_port()
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    env = {
        **os.environ,
        "PATH": flower_path(),
        "FLWR_HOME": str(tmp_path / "attacker-flwr"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "OMP_NUM_THREADS": "1",
    }
    data = tmp_path / "device.jsonl"
    data.write_text(
        "".join(json.dumps({"device": "victim", "text": f"record {i}"}) + "\n" for i in range(4))
    )
    state = tmp_path / "device-state"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            subprocess.Popen(
                [
                    flower_executable("flower-superlink"),
                    "--insecure",
                    "--database",
                    ":flwr-in-memory:",
                    "--fleet-api-address",
                    f"127.0.0.1:{port}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port + 1),
                    "--isolation",
                    "subprocess",
                ],
                stdout=(tmp_path / "superlink.log").open("wb"),
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "fedlora.cli", "device", "--coordinator",
                 f"127.0.0.1:{port}", "--data", str(data), "--insecure", "--allow-plain",
                 "--device-id", "victim", "--state-dir", str(state)],
                stdout=(tmp_path / "device.log").open("wb"),
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        )  # fmt: skip
        from fedlora.addresses import wait_for_port

        wait_for_port("127.0.0.1", port + 1, 60)
        run_id = submit_to_control_api(
            f"127.0.0.1:{port + 1}", evil_fab(marker_dir, shadow=True), None
        )
        assert run_id, "the plain SuperLink should accept the attacker's run"

        replies_file = marker_dir / "replies.json"
        deadline = time.monotonic() + 180
        while not replies_file.exists() and time.monotonic() < deadline:
            for p in procs:
                assert p.poll() is None, (tmp_path / "device.log").read_text()[-2000:]
            time.sleep(1)
        assert replies_file.exists(), (tmp_path / "superlink.log").read_text()[-3000:]
        replies = json.loads(replies_file.read_text())
    finally:
        for p in procs:
            stop_process(p)

    # The attacker's ServerApp ran on the attacker's own SuperLink ...
    assert [m for m in markers(marker_dir) if m.startswith("serverapp-")]
    # ... but nothing of the bundle ran on the device, and the device said why.
    assert [m for m in markers(marker_dir) if m.startswith("clientapp-")] == []
    assert len(replies) == 1 and replies[0]["error"], replies
    assert "fedlora" in replies[0]["error"] and "client/app.py" in replies[0]["error"]
    log = (state / "clientapp.log").read_text(errors="replace")
    refusals = [line for line in log.splitlines() if "refused the run's app bundle" in line]
    assert len(refusals) == 1, log[-3000:]
    # Nothing of it was unpacked under the device's Flower home either.
    assert not list((state / "flwr").glob("apps/*")), list((state / "flwr").rglob("*"))
