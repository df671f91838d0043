"""deploy/k8s: well-formed objects, kustomizations, ports and probes, security, volumes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import deployfiles as df

P = 9092
PORT_NAMES = {"fleet": P, "fedlora": P + 2}  # P+1 listens on the pod's loopback only
OBJECTS = df.load_k8s_objects()
WORKLOADS = [(path, obj) for path, obj in OBJECTS if df.pod_spec(obj) is not None]


def ident(item: tuple[Path, dict[str, Any]]) -> str:
    path, obj = item
    return f"{path.relative_to(df.K8S)}:{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def find(kind: str, name: str) -> dict[str, Any]:
    for _path, obj in OBJECTS:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind}/{name} under deploy/k8s")


def pki_objects() -> dict[tuple[str, str], set[str]]:
    """(kind, name) → data keys of what deploy/k8s/pki.sh creates with kubectl."""
    text = (df.K8S / "pki.sh").read_text().replace("\\\n", " ")
    out: dict[tuple[str, str], set[str]] = {}
    for kind, name, rest in re.findall(
        r"kubectl create (secret generic|configmap) (\S+)(.*)", text
    ):
        keys = set(re.findall(r"--from-file=([\w.-]+)=", rest))
        if '"$@"' in rest:  # the device keys, one --from-file per ordinal
            keys |= {"device-$i.key"}
        out[("Secret" if kind.startswith("secret") else "ConfigMap", name)] = keys
    return out


def test_every_manifest_parses_and_names_itself() -> None:
    assert OBJECTS
    for path, obj in OBJECTS:
        assert isinstance(obj, dict), path
        assert obj.get("apiVersion") and obj.get("kind"), path
        assert obj.get("metadata", {}).get("name"), path
        assert "namespace" not in obj["metadata"], f"{path}: the kustomization sets it"


@pytest.mark.parametrize("directory", df.k8s_dirs(), ids=lambda p: str(p.relative_to(df.DEPLOY)))
def test_kustomization_lists_exactly_the_manifests_beside_it(directory: Path) -> None:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    listed = set(kustomization.get("resources", []))
    present = {p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == present
    for generator in kustomization.get("configMapGenerator", []):
        for file in generator.get("files", []):
            assert (directory / file.split("=")[-1]).is_file(), file
    assert kustomization["namespace"] == "fedlora"
    images = {i["name"] for i in kustomization.get("images", [])}
    used = {
        c["image"].split(":")[0]
        for path, obj in WORKLOADS
        if path.parent == directory
        for c in df.containers(df.pod_spec(obj) or {})
    }
    assert used <= images <= set(df.IMAGES)


@pytest.mark.parametrize("item", WORKLOADS, ids=ident)
def test_pods_run_non_root_under_the_restricted_profile(item: tuple[Path, dict]) -> None:
    _path, obj = item
    pod = df.pod_spec(obj)
    assert pod is not None
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for c in df.containers(pod):
        uid = df.dockerfile(c["image"]).all("USER")[-1].args.split(":")[0]
        assert security["runAsUser"] == int(uid), "the image's user"
        cs = c["securityContext"]
        assert cs["runAsNonRoot"] is True
        assert cs["allowPrivilegeEscalation"] is False
        assert cs["capabilities"]["drop"] == ["ALL"]
        assert cs["readOnlyRootFilesystem"] is True
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{c['name']}: {kind}"


@pytest.mark.parametrize("item", WORKLOADS, ids=ident)
def test_volume_mounts_refer_to_defined_volumes_and_every_volume_is_used(
    item: tuple[Path, dict],
) -> None:
    _path, obj = item
    pod = df.pod_spec(obj)
    assert pod is not None
    defined = {v["name"] for v in pod.get("volumes", [])}
    claims = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
    assert not defined & claims
    mounted = {m["name"] for c in df.containers(pod) for m in c.get("volumeMounts", [])}
    assert mounted <= defined | claims, f"undefined volumes {mounted - defined - claims}"
    assert defined | claims <= mounted, f"unused volumes {(defined | claims) - mounted}"


@pytest.mark.parametrize("item", WORKLOADS, ids=ident)
def test_referenced_secrets_and_configmaps_exist(item: tuple[Path, dict]) -> None:
    path, obj = item
    pod = df.pod_spec(obj)
    assert pod is not None
    kustomization = yaml.safe_load((path.parent / "kustomization.yaml").read_text())
    generated = {("ConfigMap", g["name"]) for g in kustomization.get("configMapGenerator", [])}
    available = generated | set(pki_objects())
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            assert ("Secret", volume["secret"]["secretName"]) in available, volume
        if "configMap" in volume:
            assert ("ConfigMap", volume["configMap"]["name"]) in available, volume


def test_the_coordinator_statefulset_keeps_its_data_dir_on_a_claim() -> None:
    sts = find("StatefulSet", "coordinator")
    assert sts["spec"]["replicas"] == 1
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    data_dir = args[args.index("--data-dir") + 1]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == data_dir)
    assert mount["name"] == claim["metadata"]["name"]
    assert int(args[args.index("--port") + 1]) == P
    # the registry ConfigMap is the coordinator's registry/ directory, read-only
    registry = next(m for m in container["volumeMounts"] if m["name"] == "registry")
    assert registry["mountPath"] == f"{data_dir}/registry" and registry["readOnly"] is True


def test_coordinator_ports_and_probes_follow_the_port_scheme() -> None:
    pod = find("StatefulSet", "coordinator")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == PORT_NAMES
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        port = container[probe]["tcpSocket"]["port"]
        number = ports.get(port, port)
        assert number in (P, P + 2), f"{probe} must check a gRPC port, not the Control API"


def test_the_coordinator_service_exposes_fleet_and_services_inside_the_cluster_only() -> None:
    service = find("Service", "coordinator")
    assert service["spec"]["type"] == "ClusterIP"
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {name: (number, name) for name, number in PORT_NAMES.items()}
    for _path, obj in OBJECTS:
        if obj["kind"] == "Service":
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", "nothing public"


def test_services_select_pods_and_statefulsets_name_their_governing_service() -> None:
    templates = [
        obj["spec"]["template"]["metadata"]["labels"]
        for _p, obj in OBJECTS
        if obj["kind"] in ("StatefulSet", "Deployment")
    ]
    for _path, obj in OBJECTS:
        if obj["kind"] == "Service":
            selector = obj["spec"]["selector"]
            assert any(selector.items() <= labels.items() for labels in templates), obj
        if obj["kind"] == "StatefulSet":
            spec = obj["spec"]
            assert (
                spec["selector"]["matchLabels"].items()
                <= spec["template"]["metadata"]["labels"].items()
            )
            governing = find("Service", spec["serviceName"])
            assert governing["spec"]["clusterIP"] == "None"


def test_devices_are_a_statefulset_with_a_ledger_per_ordinal() -> None:
    sts = find("StatefulSet", "device")
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    device = next(c for c in pod["containers"] if c["name"] == "device")
    args = device["args"]
    (claim,) = spec["volumeClaimTemplates"]
    state = next(m for m in device["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert args[args.index("--state-dir") + 1] == state["mountPath"]
    # $(POD_NAME) picks this ordinal's key and data; Kubernetes expands it from the env
    assert "$(POD_NAME)" in args[args.index("--key") + 1]
    assert args[args.index("--data") + 1] == "/data/$(POD_NAME).jsonl"
    env = {e["name"]: e.get("valueFrom", {}) for e in device["env"]}
    assert env["POD_NAME"]["fieldRef"]["fieldPath"] == "metadata.name"
    # one data file and one registered key per replica
    demo = next(c for c in pod["initContainers"] if c["name"] == "demo-data")
    assert int(demo["args"][demo["args"].index("--devices") + 1]) == spec["replicas"]
    pki = (df.K8S / "pki.sh").read_text()
    assert f'DEVICES="${{DEVICES:-{spec["replicas"]}}}"' in pki
    # devices serve nothing: no ports, so nothing to probe
    assert "ports" not in device and "livenessProbe" not in device


def test_the_device_container_sees_only_its_own_key() -> None:
    pod = find("StatefulSet", "device")["spec"]["template"]["spec"]
    device = next(c for c in pod["containers"] if c["name"] == "device")
    select = next(c for c in pod["initContainers"] if c["name"] == "select-key")
    all_keys = next(v for v in pod["volumes"] if "secret" in v)
    assert all_keys["secret"]["secretName"] == "fedlora-device-keys"
    assert all_keys["name"] not in {m["name"] for m in device["volumeMounts"]}
    assert all_keys["name"] in {m["name"] for m in select["volumeMounts"]}
    key_volume = next(v for v in pod["volumes"] if v["name"] == "key")
    assert key_volume["emptyDir"]["medium"] == "Memory"


def test_the_cluster_gets_no_ca_key_and_the_operator_key_for_the_run_job_only() -> None:
    objects = pki_objects()
    assert objects[("Secret", "fedlora-coordinator-tls")] == {
        "ca.crt", "server.crt", "server.key", "operator.pub",
    }  # fmt: skip
    assert objects[("ConfigMap", "fedlora-ca")] == {"ca.crt"}
    assert objects[("ConfigMap", "fedlora-device-registry")] == {"devices.json"}
    assert objects[("Secret", "fedlora-operator-key")] == {"operator.key"}
    for name, keys in objects.items():
        assert "ca.key" not in keys
        assert "operator.key" not in keys or name == ("Secret", "fedlora-operator-key")
    mounting = {
        f"{obj['kind']}/{obj['metadata']['name']}"
        for _path, obj in WORKLOADS
        for volume in (df.pod_spec(obj) or {}).get("volumes", [])
        if volume.get("secret", {}).get("secretName") == "fedlora-operator-key"
    }
    assert mounting == {"Job/fedlora-run"}


def test_the_coordinator_admits_the_fleet_api_and_fedloras_services_only() -> None:
    policy = find("NetworkPolicy", "coordinator-ingress")
    (rule,) = policy["spec"]["ingress"]
    assert "from" not in rule  # devices may come through a load balancer
    assert {p["port"] for p in rule["ports"]} == {P, P + 2}


def test_the_run_job_signs_with_the_operator_key_and_is_not_retried() -> None:
    job = find("Job", "fedlora-run")
    assert job["spec"]["backoffLimit"] == 0, "a retried `fedlora run` is another run"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    key = args[args.index("--key") + 1]
    mount = next(m for m in container["volumeMounts"] if key.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "fedlora-operator-key"
    assert [i["path"] for i in volume["secret"]["items"]] == [key.rsplit("/", 1)[-1]]
    assert mount["readOnly"] is True
    # Secret files are root's: group-readable (0440) by the pod's fsGroup, the image's user
    assert volume["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]
