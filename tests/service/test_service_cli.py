"""``fedlora models``, ``budget`` and ``fleet-report`` against a real TLS coordinator service."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedlora.cli import main
from fedlora.cli.service import STAGING
from fedlora.privacy import PrivacyLedger, epsilon_for
from fedlora.reporting.rundir import load_run, report_for
from fedlora.server.service import CHUNK_BYTES, Caller, ModelServicer, ServiceServer
from tests.service.conftest import Coordinator, running


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _export(coordinator: Coordinator, rel: str) -> Path:
    return coordinator.data_dir / "runs" / "run-a" / "export" / rel


def _conn(coordinator: Coordinator, server: ServiceServer, device: str = "d1") -> list[str]:
    # The CLI takes the coordinator's Fleet API port P and calls its services on P+2.
    return [
        "--coordinator",
        f"127.0.0.1:{server.port - 2}",
        "--key",
        str(coordinator.key(device)),
        "--root-cert",
        str(coordinator.ca),
        "--timeout",
        "10",
    ]


def _run(capsys: Any, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err: str) -> str:
    assert err.startswith("fedlora: error: ")
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


class Recording:
    """The real ModelService, recording each download's (path, offset); ``flip`` corrupts one
    byte of the second chunk of every file long enough to have one."""

    def __init__(self, data_dir: Path) -> None:
        self.real = ModelServicer(data_dir)
        self.flip = False
        self.downloads: list[tuple[str, int]] = []

    def ListModels(self, request: Any, context: Any, caller: Caller) -> Any:
        return self.real.ListModels(request, context, caller)

    def DownloadModel(self, request: Any, context: Any, caller: Caller) -> Iterator[Any]:
        self.downloads.append((request.path, request.offset))
        for i, response in enumerate(self.real.DownloadModel(request, context, caller)):
            if self.flip and i == 2:
                data = bytearray(response.chunk.data)
                data[7] ^= 0x01
                response.chunk.data = bytes(data)
            yield response


@pytest.fixture
def recording(coordinator: Coordinator) -> Iterator[tuple[Recording, ServiceServer]]:
    service = Recording(coordinator.data_dir)
    with running(coordinator.data_dir, model_servicer=service) as srv:
        yield service, srv


# ------------------------------------------------------------------ models list
def test_list_shows_the_released_models(
    coordinator: Coordinator, server: ServiceServer, capsys: Any
) -> None:
    code, out, _ = _run(capsys, "models", "list", *_conn(coordinator, server))

    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "VERSION",
        "FORMAT",
        "QUANT",
        "SIZE",
        "KL",
        "TOP-1",
        "FILE",
        "SHA256",
    ]
    int8 = next(line for line in lines if line.startswith("run-a/int8"))
    sha = _sha(_export(coordinator, "int8/model.bin"))
    assert int8.split() == [
        "run-a/int8",
        "pytorch-int8",
        "int8",
        "700.0",
        "kB",
        "4.00e-03",
        "0.9700",
        "int8/model.bin",
        sha[:12],
    ]
    assert any(line.startswith("run-a/merged") for line in lines)
    assert "run-a/q4" not in out  # outside its quality gate: not released


def test_list_json_has_every_file_with_its_full_digest(
    coordinator: Coordinator, server: ServiceServer, capsys: Any
) -> None:
    code, out, _ = _run(capsys, "models", "list", *_conn(coordinator, server), "--format", "json")

    assert code == 0
    models = {m["version"]: m for m in json.loads(out)}
    assert sorted(models) == ["run-a/int8", "run-a/merged"]
    merged = models["run-a/merged"]
    assert merged["quality"] == {"kl": 1e-9, "top1_agreement": 1.0, "perplexity": 41.5}
    assert {f["path"]: f["sha256"] for f in merged["files"]} == {
        rel: _sha(_export(coordinator, rel))
        for rel in ("merged/config.json", "merged/model.safetensors")
    }


def test_list_over_plaintext_with_insecure(coordinator: Coordinator, capsys: Any) -> None:
    from fedlora.server.service import serve

    srv = serve(coordinator.data_dir, "127.0.0.1", 0, None)
    try:
        conn = ["--coordinator", f"127.0.0.1:{srv.port - 2}", "--key", str(coordinator.key("d1"))]
        code, out, _ = _run(capsys, "models", "list", *conn, "--insecure", "--format", "json")
    finally:
        srv.stop(None).wait()

    assert code == 0
    assert [m["version"] for m in json.loads(out)] == ["run-a/int8", "run-a/merged"]


# ------------------------------------------------------------------ models pull
def test_pull_installs_every_file_verified(
    coordinator: Coordinator,
    recording: tuple[Recording, ServiceServer],
    tmp_path: Path,
    capsys: Any,
) -> None:
    service, srv = recording
    out_dir = tmp_path / "models"

    code, out, _ = _run(
        capsys, "models", "pull", "run-a/merged", *_conn(coordinator, srv), "--out", str(out_dir)
    )

    assert code == 0
    for rel in ("merged/config.json", "merged/model.safetensors"):
        assert _sha(out_dir / rel) == _sha(_export(coordinator, rel))
        assert f"installed {out_dir / rel}" in out
    assert sorted(service.downloads) == [
        ("merged/config.json", 0),
        ("merged/model.safetensors", 0),
    ]
    assert not (out_dir / STAGING).exists()


def test_pull_again_is_a_no_op(
    coordinator: Coordinator,
    recording: tuple[Recording, ServiceServer],
    tmp_path: Path,
    capsys: Any,
) -> None:
    service, srv = recording
    argv = ["models", "pull", "run-a/int8", *_conn(coordinator, srv), "--out", str(tmp_path)]
    assert _run(capsys, *argv)[0] == 0
    dest = tmp_path / "int8" / "model.bin"
    before = dest.stat()

    code, out, _ = _run(capsys, *argv)

    assert code == 0
    assert f"{dest} is already installed and intact" in out
    assert service.downloads == [("int8/model.bin", 0)]  # the second run fetched nothing
    after = dest.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_pull_resumes_a_partial_download(
    coordinator: Coordinator,
    recording: tuple[Recording, ServiceServer],
    tmp_path: Path,
    capsys: Any,
) -> None:
    service, srv = recording
    source = _export(coordinator, "int8/model.bin")
    part = tmp_path / STAGING / "run-a%2Fint8" / "int8" / "model.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(source.read_bytes()[:CHUNK_BYTES])  # what an interrupted run left

    code, _, _ = _run(
        capsys, "models", "pull", "run-a/int8", *_conn(coordinator, srv), "--out", str(tmp_path)
    )

    assert code == 0
    assert service.downloads == [("int8/model.bin", CHUNK_BYTES)]
    assert _sha(tmp_path / "int8" / "model.bin") == _sha(source)


def test_pull_of_one_file(
    coordinator: Coordinator, server: ServiceServer, tmp_path: Path, capsys: Any
) -> None:
    argv = ["models", "pull", "run-a/merged", *_conn(coordinator, server), "--out", str(tmp_path)]

    code, _, _ = _run(capsys, *argv, "--path", "merged/config.json")

    assert code == 0
    assert (tmp_path / "merged" / "config.json").read_bytes() == json.dumps(
        {"vocab_size": 97}
    ).encode()
    assert not (tmp_path / "merged" / "model.safetensors").exists()


def test_a_corrupted_download_installs_nothing(
    coordinator: Coordinator,
    recording: tuple[Recording, ServiceServer],
    tmp_path: Path,
    capsys: Any,
) -> None:
    service, srv = recording
    service.flip = True  # model.safetensors arrives corrupted; config.json (one chunk) intact

    code, out, err = _run(
        capsys, "models", "pull", "run-a/merged", *_conn(coordinator, srv), "--out", str(tmp_path)
    )

    assert code == 8
    assert "arrived corrupted" in _one_line_error(err)
    assert "nothing was installed" in err
    assert not (tmp_path / "merged").exists()  # not even the intact config.json
    assert "installed" not in out


def test_pull_of_an_unknown_version(
    coordinator: Coordinator, server: ServiceServer, tmp_path: Path, capsys: Any
) -> None:
    code, _, err = _run(
        capsys, "models", "pull", "run-a/q4", *_conn(coordinator, server), "--out", str(tmp_path)
    )

    assert code == 8
    assert "no released model 'run-a/q4'" in _one_line_error(err)
    assert "run-a/int8, run-a/merged" in err


# ------------------------------------------------------------------ user errors
def test_an_unregistered_key_is_told_to_get_registered(
    coordinator: Coordinator, server: ServiceServer, capsys: Any
) -> None:
    code, out, err = _run(capsys, "models", "list", *_conn(coordinator, server, "stranger"))

    assert code != 0
    assert out == ""
    assert "device stranger is not registered" in _one_line_error(err)
    assert "fedlora keys register" in err


def test_a_missing_key_file(coordinator: Coordinator, server: ServiceServer, capsys: Any) -> None:
    conn = _conn(coordinator, server)
    conn[conn.index("--key") + 1] = "/nonexistent/phone.key"

    code, _, err = _run(capsys, "budget", *conn)

    assert code == 2
    assert "key /nonexistent/phone.key does not exist" in _one_line_error(err)


def test_an_unreachable_coordinator_fails_within_the_timeout(
    coordinator: Coordinator, capsys: Any
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["--coordinator", f"127.0.0.1:{port - 2}", "--key", str(coordinator.key("d1"))]

    code, _, err = _run(
        capsys, "budget", *argv, "--root-cert", str(coordinator.ca), "--timeout", "1"
    )

    assert code != 0
    assert f"cannot reach the coordinator's services at 127.0.0.1:{port}" in _one_line_error(err)


# ------------------------------------------------------------------ budget
def test_budget_json_is_the_composition_of_the_ledgers(
    coordinator: Coordinator, server: ServiceServer, capsys: Any
) -> None:
    code, out, _ = _run(capsys, "budget", *_conn(coordinator, server), "--format", "json")

    events = [
        e
        for run in ("run-a", "run-b")
        for e in PrivacyLedger.load(
            coordinator.data_dir / "runs" / run / "privacy" / "ledger.json"
        ).events_for("d1")
    ]
    spent = epsilon_for(events, 1e-5, "rdp")
    assert code == 0
    assert json.loads(out) == {
        "device_id": "d1",
        "epsilon_spent": spent,
        "epsilon_remaining": 4.0 - spent,  # run-b's budget: the latest run d1 trained in
        "epsilon_budget": 4.0,
        "delta": 1e-5,
        "accountant": "rdp",
        "rounds_trained": 3,
        "runs": ["run-a", "run-b"],
        "budget_run": "run-b",
        "policy_unit": "record",
        "device_level": None,  # never in a device-level sum, and run-b protects records
    }


def test_budget_table(coordinator: Coordinator, server: ServiceServer, capsys: Any) -> None:
    code, out, _ = _run(capsys, "budget", *_conn(coordinator, server, "d2"))

    ledger = PrivacyLedger.load(coordinator.data_dir / "runs" / "run-a" / "privacy" / "ledger.json")
    spent = epsilon_for(ledger.events_for("d2"), 1e-5, "rdp")
    assert code == 0
    assert out.splitlines()[:6] == [
        "device d2",
        "  record-level (unit: one training record; DP-SGD)",
        f"  ε spent      {spent:.4f} of 3",
        f"  ε remaining  {3.0 - spent:.4f}",
        "  δ            1e-05",
        "  accountant   rdp",
    ]


def test_the_operator_asks_about_any_device_and_a_device_only_about_itself(
    coordinator: Coordinator, server: ServiceServer, capsys: Any
) -> None:
    operator = _conn(coordinator, server, "operator")

    code, out, _ = _run(capsys, "budget", *operator, "--device", "d2", "--format", "json")
    assert code == 0
    assert json.loads(out)["device_id"] == "d2"

    code, _, err = _run(capsys, "budget", *operator)
    assert code == 2
    assert "add --device DEVICE" in _one_line_error(err)

    code, _, err = _run(capsys, "budget", *_conn(coordinator, server), "--device", "d2")
    assert code != 0
    assert "may only ask for its own budget" in _one_line_error(err)


# ------------------------------------------------------------------ fleet report
def test_fleet_report_is_refused_to_a_device(
    coordinator: Coordinator, server: ServiceServer, capsys: Any
) -> None:
    code, out, err = _run(capsys, "fleet-report", *_conn(coordinator, server))

    assert code != 0
    assert out == ""
    assert "for the operator only" in _one_line_error(err)


def test_fleet_report_for_the_operator(
    coordinator: Coordinator, server: ServiceServer, tmp_path: Path, capsys: Any
) -> None:
    operator = _conn(coordinator, server, "operator")
    runs = coordinator.data_dir / "runs"

    code, out, _ = _run(capsys, "fleet-report", *operator)
    assert code == 0
    assert json.loads(out) == json.loads(json.dumps(report_for(load_run(runs / "run-b"))))

    dest = tmp_path / "reports" / "run-a.json"
    code, out, _ = _run(capsys, "fleet-report", *operator, "--run", "run-a", "--out", str(dest))
    assert code == 0
    assert out == f"fedlora: wrote the privacy report of run run-a to {dest}\n"
    assert json.loads(dest.read_text()) == json.loads(
        json.dumps(report_for(load_run(runs / "run-a")))
    )


def test_budget_table_names_both_units(
    coordinator: Coordinator, server: ServiceServer, capsys: Any
) -> None:
    from fedlora.privacy.accountants.ddg import epsilon_for_device
    from tests.service.helpers import ddg_event, touch_later, write_device_level_run

    run_c = coordinator.data_dir / "runs" / "run-c"
    write_device_level_run(run_c, [ddg_event("d2", 1)], unit="both", device_epsilon=6.0)
    touch_later(run_c / "privacy" / "ledger.json", 120)

    code, out, _ = _run(capsys, "budget", *_conn(coordinator, server, "d2"))

    ledger = PrivacyLedger.load(run_c / "privacy" / "ledger.json")
    spent = epsilon_for_device(ledger.events_for("d2", unit="device"), 1e-6)
    lines = out.splitlines()
    assert code == 0
    start = lines.index(
        "  device-level (unit: the device's whole data; distributed discrete Gaussian)"
    )
    assert lines[start + 1 : start + 6] == [
        f"  ε spent      {spent:.4f} of 6",
        f"  ε remaining  {6.0 - spent:.4f}",
        "  δ            1e-06",
        "  accountant   ddg-rdp",
        "  in sums      1 round(s) in run-c",
    ]
    assert lines[-1] == "  budget from  run-c (latest run it trained in; privacy.unit both)"
