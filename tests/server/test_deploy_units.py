"""The deployment commands' small parts, without starting processes (tests/e2e does that)."""

from __future__ import annotations

import json
import zipfile
from io import BytesIO

import pytest

from fedlora.addresses import CoordinatorAddress
from fedlora.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "fleet", "control", "service"),
    [
        ("coord", "coord:9092", "127.0.0.1:9093", "coord:9094"),
        ("coord:7000", "coord:7000", "127.0.0.1:7001", "coord:7002"),
        ("[::1]:7000", "[::1]:7000", "127.0.0.1:7001", "[::1]:7002"),
        ("::1", "[::1]:9092", "127.0.0.1:9093", "[::1]:9094"),
        ("10.0.0.5", "10.0.0.5:9092", "127.0.0.1:9093", "10.0.0.5:9094"),
    ],
)
def test_coordinator_address_derives_three_ports(text, fleet, control, service):
    """The Control API (P+1) is always the coordinator's loopback: nothing else may reach it."""
    addr = CoordinatorAddress.parse(text)
    assert (addr.fleet, addr.control, addr.service) == (fleet, control, service)


@pytest.mark.parametrize("bad", ["", ":9092", "coord:http", "coord:0", "[::1]x", "coord:70000"])
def test_bad_coordinator_address_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="HOST"):
        CoordinatorAddress.parse(bad)


def test_a_wildcard_listener_is_dialled_on_loopback():
    assert CoordinatorAddress("0.0.0.0", 9092).local.fleet == "127.0.0.1:9092"
    assert CoordinatorAddress("coord", 9092).local.service == "coord:9094"


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "coord.example.org", "::"])
def test_superlink_binds_its_control_api_to_loopback_whatever_the_host(tmp_path, host):
    from fedlora.server.coordinator import CoordinatorLayout, superlink_command

    cmd = superlink_command(CoordinatorLayout(tmp_path), CoordinatorAddress(host, 7000), None)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "7001"
    assert cmd[cmd.index("--fleet-api-address") + 1].endswith(":7000")
    # fedlora, not Flower, starts the ServerApp tasks: after checking their bundle.
    assert cmd[cmd.index("--isolation") + 1] == "process"


def test_node_config_quotes_strings_for_flower():
    from flwr.common.config import parse_config_args

    from fedlora.client.device import node_config

    text = node_config({"data-path": "/data/my file.jsonl", "device-id": "d-1", "budget": 2.5})
    parsed = parse_config_args([text])
    assert parsed == {"data-path": "/data/my file.jsonl", "device-id": "d-1", "budget": 2.5}


def test_run_bundle_carries_no_code_only_the_installed_apps():
    from fedlora.server.control import build_fab

    with zipfile.ZipFile(BytesIO(build_fab())) as fab:
        names = fab.namelist()
        pyproject = fab.read("pyproject.toml").decode()
    assert not [n for n in names if n.endswith(".py")], names
    assert 'serverapp = "fedlora.server.app:app"' in pyproject
    assert 'clientapp = "fedlora.client.app:app"' in pyproject
    assert "fedlora-config-json" in pyproject


def test_run_name_must_be_a_directory_name(tmp_path):
    import argparse

    from fedlora.cli.run import resolve_run_config

    for bad in ("../x", "a/b", "", ".hidden", "x" * 65):
        args = argparse.Namespace(config=None, name=bad or "/")
        with pytest.raises(ConfigError):
            resolve_run_config(args)
    _, name = resolve_run_config(argparse.Namespace(config=None, name="first-run_1.2"))
    assert name == "first-run_1.2"


def test_restart_marks_running_runs_interrupted_and_leaves_finished_ones(tmp_path):
    from fedlora.server.coordinator import mark_interrupted

    for name, status in (("a", "running"), ("b", "complete"), ("c", "failed")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps({"status": status}))
    assert mark_interrupted(tmp_path) == ["a"]
    assert json.loads((tmp_path / "a" / "run.json").read_text())["status"] == "interrupted"
    assert json.loads((tmp_path / "b" / "run.json").read_text())["status"] == "complete"
    assert mark_interrupted(tmp_path) == []


def test_deployed_run_dir_stays_inside_the_coordinators_runs(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from fedlora.server.app import RUNS_DIR_ENV, resolve_run_dir

    monkeypatch.setenv(RUNS_DIR_ENV, str(tmp_path))
    ctx = SimpleNamespace(run_config={"run-dir": "first"}, run_id=7)
    assert resolve_run_dir(ctx) == (tmp_path / "first").resolve()
    ctx = SimpleNamespace(run_config={"run-dir": ""}, run_id=7)
    assert resolve_run_dir(ctx) == (tmp_path / "run-7").resolve()
    with pytest.raises(ConfigError):
        resolve_run_dir(SimpleNamespace(run_config={"run-dir": "../escape"}, run_id=7))


def test_device_refuses_bad_inputs_before_starting_anything(tmp_path, capsys):
    from fedlora.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"device": "d", "text": "one"}\n{"device": "d", "text": "two"}\n')
    base = ["device", "--coordinator", "127.0.0.1:1", "--data", str(data)]
    assert main([*base]) == 2  # no key, not --insecure
    assert "--key" in capsys.readouterr().err
    assert main([*base, "--key", str(tmp_path / "missing.key"), "--root-cert", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.key").write_text("not a key")
    assert main([*base, "--key", str(tmp_path / "bad.key"), "--root-cert", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
