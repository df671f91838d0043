"""Nothing outside the coordinator can reach P+1, the SuperLink's Control API.

The coordinator binds the Control API to its own loopback whatever ``--host`` is, and
``fedlora run`` talks to the signed RunService on P+2 instead. These checks keep the
deployment files from opening P+1 again: no compose service publishes or exposes it, no
image EXPOSEs it, no Kubernetes Service or container port names it, and no NetworkPolicy
rule admits it (a rule without ``ports`` admits every port, so that counts too).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.deploy import deployfiles as df

P = 9092
CONTROL = P + 1


def _port_range(text: str) -> range:
    """``"9093"``, ``"9090-9095"`` or ``"9093/tcp"`` → the ports it covers."""
    text = text.split("/")[0]
    low, _, high = text.partition("-")
    return range(int(low), int(high or low) + 1)


def compose_container_ports(spec: Any) -> range:
    """The container ports one compose ``ports:`` entry publishes (short or long syntax)."""
    if isinstance(spec, dict):
        return _port_range(str(spec["target"]))
    return _port_range(str(spec).rsplit(":", 1)[-1])


@pytest.mark.parametrize(
    ("spec", "covers"),
    [
        ("9092:9092", False),
        ("127.0.0.1:9093:9093", True),
        ("19093:9093", True),
        ("9090-9095:9090-9095", True),
        ("9093/tcp", True),
        ({"target": 9093, "published": 9093}, True),
        ({"target": 9094, "published": 9093}, False),  # publishes container port 9094
    ],
)
def test_the_compose_port_reader_sees_every_form(spec: Any, covers: bool) -> None:
    assert (CONTROL in compose_container_ports(spec)) is covers


@pytest.mark.parametrize("name", sorted(df.load_compose()["services"]))
def test_no_compose_service_publishes_or_exposes_the_control_api(name: str) -> None:
    svc = df.load_compose()["services"][name]
    published = [spec for spec in svc.get("ports", []) if CONTROL in compose_container_ports(spec)]
    exposed = [spec for spec in svc.get("expose", []) if CONTROL in _port_range(str(spec))]
    assert published == [], f"{name} publishes the Control API: {published}"
    assert exposed == [], f"{name} exposes the Control API: {exposed}"
    assert svc.get("network_mode") != "host", f"{name} shares the host's network"


@pytest.mark.parametrize("image", sorted(df.IMAGES))
def test_no_image_exposes_the_control_api(image: str) -> None:
    parsed = df.dockerfile(image)
    exposed = [p for i in parsed.all("EXPOSE") for p in i.args.split()]
    assert not [p for p in exposed if CONTROL in _port_range(parsed.expand(p))], exposed


def _named_container_ports() -> dict[str, int]:
    names = {}
    for _path, obj in df.load_k8s_objects():
        for c in df.containers(df.pod_spec(obj) or {}):
            for port in c.get("ports", []):
                if "name" in port:
                    names[port["name"]] = port["containerPort"]
    return names


def test_no_kubernetes_container_declares_the_control_api() -> None:
    for _path, obj in df.load_k8s_objects():
        pod = df.pod_spec(obj)
        assert not (pod or {}).get("hostNetwork"), f"{obj['metadata']['name']}: hostNetwork"
        for c in df.containers(pod or {}):
            for port in c.get("ports", []):
                assert CONTROL not in (port["containerPort"], port.get("hostPort")), c["name"]


def test_no_kubernetes_service_targets_the_control_api() -> None:
    names = _named_container_ports()
    services = [obj for _path, obj in df.load_k8s_objects() if obj["kind"] == "Service"]
    assert services
    for service in services:
        for port in service["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            number = names.get(target, target) if isinstance(target, str) else target
            assert CONTROL not in (port["port"], number), f"Service/{service['metadata']['name']}"


def test_no_network_policy_admits_the_control_api() -> None:
    names = _named_container_ports()
    policies = [obj for _path, obj in df.load_k8s_objects() if obj["kind"] == "NetworkPolicy"]
    assert policies
    for policy in policies:
        where = f"NetworkPolicy/{policy['metadata']['name']}"
        assert "Ingress" in policy["spec"].get("policyTypes", ["Ingress"]), where
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("ports"), f"{where}: a rule without ports admits every port"
            for port in rule["ports"]:
                assert "port" in port, f"{where}: a port entry without a port admits all"
                number = names.get(port["port"], port["port"])
                assert isinstance(number, int), f"{where}: unknown named port {number}"
                assert CONTROL not in range(number, port.get("endPort", number) + 1), where


def test_the_walkthrough_never_forwards_or_dials_the_control_api() -> None:
    text = (df.DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        assert str(CONTROL) not in block, block
