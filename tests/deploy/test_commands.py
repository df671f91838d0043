"""Every fedlora command the deployment files run is one fedlora's own parser accepts.

The compose file, the Kubernetes manifests, deploy/k8s/pki.sh and the README's code
blocks are parsed with ``fedlora.cli.build_parser`` (argparse exits on an unknown flag or
a missing required one), and the commands that run services are held to the same flags a
real deployment needs: TLS everywhere, state on a volume.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from functools import cache

import pytest

from tests.deploy import deployfiles as df


@cache
def parser() -> argparse.ArgumentParser:
    from fedlora.cli import build_parser

    return build_parser()


@cache
def subcommands() -> frozenset[str]:
    for action in parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return frozenset(action.choices)
    raise AssertionError("fedlora's parser has no subcommands")


def deployed() -> list[df.Launch]:
    """Commands that compose and Kubernetes run (services, one-shots, init containers)."""
    subs = set(subcommands())
    return [*df.compose_commands(subs), *df.k8s_commands(subs)]


def everything() -> list[df.Launch]:
    subs = set(subcommands())
    return [
        *deployed(),
        *df.dockerfile_commands(subs),
        *df.script_commands(df.K8S / "pki.sh", subs),
        *df.readme_commands(df.DEPLOY / "README.md", subs),
    ]


def parse(launch: df.Launch) -> argparse.Namespace | None:
    """Parse with fedlora's parser; fail with the command and argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser().parse_args(list(launch.argv))
    except SystemExit as exc:
        if exc.code == 0 and "--help" in launch.argv and launch.where.endswith(" CMD"):
            return None  # the device image's default CMD is its help
        pytest.fail(f"fedlora's parser refuses {launch}\n{err.getvalue().strip()}")


def test_the_deployment_files_run_every_kind_of_fedlora_command() -> None:
    # arrange / act
    kinds = {(launch.subcommand, launch.argv[1] if launch.subcommand == "keys" else "")
             for launch in everything()}  # fmt: skip
    # assert: the extraction sees all of them (a regression here hides commands from parsing)
    assert {("coordinator", ""), ("device", ""), ("run", ""), ("demo-data", "")} <= kinds
    assert {("keys", "init"), ("keys", "device"), ("keys", "register"), ("keys", "list")} <= kinds


@pytest.mark.parametrize("launch", everything(), ids=str)
def test_fedlora_parser_accepts_the_command(launch: df.Launch) -> None:
    parse(launch)


def test_no_deployed_command_is_insecure() -> None:
    subs = set(subcommands())
    launches = [*deployed(), *df.script_commands(df.K8S / "pki.sh", subs)]
    offenders = [str(launch) for launch in launches if launch.has("--insecure")]
    assert offenders == [], "TLS is on in compose and Kubernetes; --insecure is for local trials"


def test_coordinator_commands_keep_state_in_a_mounted_data_dir_on_a_fixed_port() -> None:
    coordinators = [x for x in deployed() if x.subcommand == "coordinator"]
    assert len(coordinators) >= 2  # compose and Kubernetes
    for launch in coordinators:
        args = parse(launch)
        assert args is not None
        assert launch.has("--data-dir") and launch.has("--port"), str(launch)
        assert args.host == "0.0.0.0", f"{launch}: a container must listen beyond loopback"
        assert args.data_dir in launch.mounts, f"{launch}: --data-dir is not on a volume"


def test_device_commands_name_coordinator_data_key_and_ca() -> None:
    devices = [x for x in deployed() if x.subcommand == "device"]
    assert len(devices) >= 4  # three in compose, the StatefulSet's template
    for launch in devices:
        args = parse(launch)
        assert args is not None
        for flag in ("--coordinator", "--data", "--key", "--root-cert", "--state-dir"):
            assert launch.has(flag), f"{launch}: no {flag}"
        for path in (args.data, args.key, args.root_cert, args.state_dir):
            assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in launch.mounts), (
                f"{launch}: {path} is on no mounted volume"
            )


def test_run_commands_trust_the_ca_sign_with_the_operator_key_and_carry_a_config() -> None:
    runs = [x for x in deployed() if x.subcommand == "run"]
    assert len(runs) >= 2  # compose's `run` service and the Kubernetes Job
    for launch in runs:
        assert launch.has("--coordinator") and launch.has("--root-cert"), str(launch)
        assert launch.has("--config"), (
            f"{launch}: a run without --config uses the 20-device default"
        )
        key = launch.value("--key")
        assert key is not None and key.endswith("operator.key"), f"{launch}: no operator key"
        assert any(key.startswith(m.rstrip("/") + "/") for m in launch.mounts), (
            f"{launch}: {key} is on no mounted volume"
        )


def test_every_documented_run_command_passes_the_operator_key() -> None:
    runs = [x for x in everything() if x.subcommand == "run" and not x.has("--insecure")]
    assert any("README" in x.where for x in runs)
    for launch in runs:
        assert launch.has("--key"), f"{launch}: the RunService needs the operator key"


def test_every_command_dials_the_port_the_coordinator_listens_on() -> None:
    launches = deployed()
    ports = {x.value("--port") for x in launches if x.subcommand == "coordinator"}
    assert ports == {"9092"}
    for launch in launches:
        if launch.subcommand in ("device", "run"):
            assert launch.value("--coordinator") == "coordinator:9092", str(launch)
