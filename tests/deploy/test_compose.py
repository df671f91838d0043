"""deploy/compose.yaml: services, ordering, volumes, ports, and the one-shots' scripts."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.deploy import deployfiles as df

CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
P = 9092


def services() -> dict[str, Any]:
    return df.load_compose()["services"]


def device_services() -> dict[str, Any]:
    return {n: s for n, s in services().items() if re.fullmatch(r"device-\d+", n)}


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """Mount target → source (a named volume or a bind path)."""
    out = {}
    for entry in svc.get("volumes", []):
        source, target = str(entry).split(":")[:2]
        out[target] = source
    return out


def pki_script() -> str:
    return services()["pki"]["command"][0].replace("$$", "$")


def test_top_level_keys_and_services() -> None:
    compose = df.load_compose()
    assert set(compose) - {"name", "services", "volumes", "networks", "configs", "secrets"} == {
        k for k in compose if k.startswith("x-")
    }
    assert {"pki", "demo-data", "coordinator", "run"} <= set(services())
    assert sorted(device_services()) == ["device-0", "device-1", "device-2"]


@pytest.mark.parametrize("name", sorted(df.load_compose()["services"]))
def test_every_service_builds_or_names_a_fedlora_image(name: str) -> None:
    svc = services()[name]
    image = svc["image"]
    assert image.split(":")[0] in df.IMAGES
    build = svc.get("build")
    if build is not None:
        context = (df.COMPOSE.parent / build["context"]).resolve()
        assert context == df.REPO
        assert df.IMAGES[image.split(":")[0]] == context / build["dockerfile"]


def test_depends_on_conditions_make_sense() -> None:
    all_services = services()
    for name, svc in all_services.items():
        for target, spec in (svc.get("depends_on") or {}).items():
            assert target in all_services, f"{name} depends on unknown {target}"
            condition = spec["condition"]
            assert condition in CONDITIONS
            other = all_services[target]
            if condition == "service_healthy":
                # a healthcheck in compose or the image's HEALTHCHECK (not NONE)
                image = df.dockerfile(other["image"])
                checks = [i.args for i in image.all("HEALTHCHECK", image.final)]
                assert "healthcheck" in other or (checks and checks[-1] != "NONE"), target
            if condition == "service_completed_successfully":
                assert other.get("restart") == "no", f"one-shot {target} must not restart"
    for name in device_services():
        deps = all_services[name]["depends_on"]
        assert deps["coordinator"]["condition"] == "service_healthy"
        assert deps["pki"]["condition"] == "service_completed_successfully"
        assert deps["demo-data"]["condition"] == "service_completed_successfully"


def test_run_is_a_profile_gated_one_shot() -> None:
    run = services()["run"]
    assert run["profiles"] == ["run"]
    assert run["restart"] == "no"
    assert run["depends_on"]["coordinator"]["condition"] == "service_healthy"
    # it sees the CA certificate, the operator key it signs with and its config: no device
    # key, no CA key, not the coordinator's state
    assert set(mounts(run).values()) == {"ca-cert", "operator-key", "./run-config.json"}
    assert mounts(run)["/operator"] == "operator-key"
    assert "operator-key:/operator:ro" in run["volumes"]


def test_volumes_are_declared_and_writable_by_the_image_user() -> None:
    declared = set(df.load_compose()["volumes"])
    used = set()
    for name, svc in services().items():
        image = df.dockerfile(svc["image"])
        for target, source in mounts(svc).items():
            if source.startswith("."):
                assert (df.COMPOSE.parent / source).is_file(), f"{name}: {source} is missing"
                continue
            assert source in declared, f"{name} mounts undeclared volume {source}"
            used.add(source)
            # A new named volume copies the ownership of the image's directory; one the
            # image does not create would be root's and unwritable for uid 10001.
            assert target in image.chowned_dirs(), f"{name}: {target} is not owned by the user"
    assert used == declared


def test_every_device_has_its_own_key_data_and_ledger_volume() -> None:
    seen: dict[str, set[str]] = {"key": set(), "data": set(), "state": set()}
    for name, svc in device_services().items():
        argv = svc["command"]
        state = mounts(svc)[argv[argv.index("--state-dir") + 1]]
        for kind, value in (
            ("key", argv[argv.index("--key") + 1]),
            ("data", argv[argv.index("--data") + 1]),
            ("state", state),
        ):
            assert value not in seen[kind], f"{name} shares its {kind} with another device"
            seen[kind].add(value)
        assert argv[argv.index("--key") + 1] == f"/keys/{name}.key"
        assert argv[argv.index("--data") + 1] == f"/data/{name}.jsonl"
        assert state == f"{name}-state"
        assert mounts(svc)["/keys"] == "device-keys"
        assert svc["volumes"][0].endswith(":ro"), "devices mount the key volume read-only"


def test_pki_makes_and_registers_a_key_for_each_device_idempotently() -> None:
    script = pki_script()
    loop = re.search(r"for i in ([\d ]+); do", script)
    assert loop, "pki no longer loops over device indices"
    assert {f"device-{i}" for i in loop.group(1).split()} == set(device_services())
    # every step is guarded or a no-op when repeated, so `up` twice keeps the keys
    assert re.search(r"if \[ ! -f /var/lib/fedlora/tls/ca.crt \]; then\s+fedlora keys init", script)
    assert re.search(r'if \[ ! -f "/keys/device-\$i.key" \]; then\s+fedlora keys device', script)
    assert "cp /var/lib/fedlora/tls/ca.crt /keys/ca.crt" in script
    assert "cp /var/lib/fedlora/tls/ca.crt /ca/ca.crt" in script
    assert "install -m 0600 /var/lib/fedlora/tls/operator.key /operator/operator.key" in script
    shell, flags = services()["pki"]["entrypoint"]
    assert shell == "/bin/sh" and "e" in flags, "stop at the first failing command (sh -e)"


def test_demo_data_covers_every_device() -> None:
    argv = services()["demo-data"]["command"]
    assert int(argv[argv.index("--devices") + 1]) == len(device_services())
    assert mounts(services()["demo-data"])["/data"] == "device-data"


def test_coordinator_publishes_the_fleet_api_and_fedloras_services_only() -> None:
    coordinator = services()["coordinator"]
    published = {}
    for spec in coordinator["ports"]:
        parts = str(spec).split(":")
        host_ip = parts[0] if len(parts) == 3 else "0.0.0.0"
        published[int(parts[-1])] = host_ip
    # P for devices, P+2 for devices and `fedlora run`; P+1 is on the coordinator's loopback
    assert published == {P: "0.0.0.0", P + 2: "0.0.0.0"}
    assert mounts(coordinator)["/var/lib/fedlora"] == "coordinator-state"


def test_run_config_is_a_valid_fedlora_config_for_the_deployed_fleet() -> None:
    from fedlora.config import load_config

    cfg = load_config(df.DEPLOY / "run-config.json")
    deployed = len(device_services())
    assert cfg.fleet.num_devices == deployed  # the coordinator waits for this many
    assert cfg.fleet.min_devices <= deployed
    assert cfg.secagg.enabled and cfg.privacy.enabled
    k8s_copy = json.loads((df.K8S / "run" / "run-config.json").read_text())
    assert k8s_copy == json.loads((df.DEPLOY / "run-config.json").read_text())
