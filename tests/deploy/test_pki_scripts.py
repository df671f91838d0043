"""The PKI scripts run for real: compose's `pki` one-shot and deploy/k8s/pki.sh.

Both run under /bin/sh with fedlora's real ``keys`` parser and handlers. ``fedlora`` on
PATH is a shim that loads only ``fedlora.cli.keys`` (the full CLI imports torch, three
seconds a call); ``kubectl`` is a stub that renders ``create secret|configmap --dry-run``
as YAML and records what is applied, so the test sees exactly what would enter the cluster.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import deployfiles as df

FEDLORA_SHIM = f"""#!{sys.executable}
import argparse, sys
sys.path.insert(0, {str(df.REPO)!r})
from fedlora.errors import FedloraError
from fedlora.cli.keys import add_keys_parser
parser = argparse.ArgumentParser(prog="fedlora")
add_keys_parser(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args()
try:
    sys.exit(args.func(args))
except FedloraError as exc:
    print(f"fedlora: error: {{exc}}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""

KUBECTL_STUB = f"""#!{sys.executable}
import base64, json, sys
from pathlib import Path
argv = sys.argv[1:]
log = Path(__file__).with_name("applied.jsonl")
if argv[:2] == ["get", "namespace"]:
    sys.exit(0 if Path(__file__).with_name("ns").exists() else 1)
if argv[:2] == ["create", "namespace"]:
    Path(__file__).with_name("ns").touch(); sys.exit(0)
if argv[0] == "create":
    kind = "Secret" if argv[1] == "secret" else "ConfigMap"
    rest = argv[3:] if kind == "Secret" else argv[2:]
    name, data = rest[0], {{}}
    assert "--dry-run=client" in rest and "yaml" in rest, argv
    for arg in rest:
        if arg.startswith("--from-file="):
            key, path = arg.split("=", 2)[1:]
            raw = Path(path).read_bytes()
            data[key] = base64.b64encode(raw).decode() if kind == "Secret" else raw.decode()
    obj = {{"apiVersion": "v1", "kind": kind, "metadata": {{"name": name}}, "data": data}}
    print(json.dumps(obj))
    sys.exit(0)
if argv[0] == "apply":
    assert argv[argv.index("-n") + 1] == "fedlora" and argv[-2:] == ["-f", "-"], argv
    with log.open("a") as out:
        out.write(json.dumps(json.loads(sys.stdin.read())) + "\\n")
    sys.exit(0)
sys.exit(f"kubectl stub: unexpected {{argv}}")
"""


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    out = tmp_path / "bin"
    out.mkdir()
    for name, text in (("fedlora", FEDLORA_SHIM), ("kubectl", KUBECTL_STUB)):
        (out / name).write_text(text)
        (out / name).chmod(0o755)
    return out


def sh(script: str, cwd: Path, bin_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env}
    result = subprocess.run(
        ["/bin/sh", "-euc", script], cwd=cwd, env=environ, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def applied(bin_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    objects = {}
    for line in (bin_dir / "applied.jsonl").read_text().splitlines():
        obj = yaml.safe_load(line)
        objects[(obj["kind"], obj["metadata"]["name"])] = obj["data"]
    return objects


def compose_pki_script(root: Path) -> str:
    """The compose `pki` script with each of its mount targets moved under ``root``."""
    svc = df.load_compose()["services"]["pki"]
    script = svc["command"][0].replace("$$", "$")
    targets = sorted((str(v).split(":")[1] for v in svc["volumes"]), key=len, reverse=True)
    for target in targets:
        local = root / target.strip("/").replace("/", "_")
        local.mkdir()
        script = re.sub(rf"(?<=[\s\"'=]){re.escape(target)}(?=[/\s\"']|$)", str(local), script)
    assert "/var/lib/fedlora" not in script and " /keys" not in script
    return script


def test_compose_pki_makes_registers_and_keeps_keys(tmp_path: Path, bin_dir: Path) -> None:
    # arrange
    script = compose_pki_script(tmp_path)
    state, keys, ca = tmp_path / "var_lib_fedlora", tmp_path / "keys", tmp_path / "ca"
    operator = tmp_path / "operator"
    # act: twice, as `docker compose up` does after a restart
    first = sh(script, tmp_path, bin_dir)
    key_bytes = (keys / "device-0.key").read_bytes()
    second = sh(script, tmp_path, bin_dir)
    # assert
    devices = [f"device-{i}" for i in range(3)]
    for out in (first.stdout, second.stdout):
        assert all(d in out for d in devices), out  # `fedlora keys list` shows them
    assert "already registered" in second.stdout
    assert (keys / "device-0.key").read_bytes() == key_bytes, "a second run replaced a key"
    ca_crt = (state / "tls" / "ca.crt").read_bytes()
    assert (keys / "ca.crt").read_bytes() == ca_crt == (ca / "ca.crt").read_bytes()
    assert sorted(p.name for p in ca.iterdir()) == ["ca.crt"], "`run` must see only the CA cert"
    # and the operator key, alone in its own volume, private to the image's user
    assert sorted(p.name for p in operator.iterdir()) == ["operator.key"]
    op_key = operator / "operator.key"
    assert op_key.read_bytes() == (state / "tls" / "operator.key").read_bytes()
    assert op_key.stat().st_mode & 0o777 == 0o600
    for d in devices:
        assert (keys / f"{d}.key").stat().st_mode & 0o077 == 0
    from fedlora.auditlog import read_events
    from fedlora.keys import DeviceRegistry

    assert sorted(DeviceRegistry(state).devices()) == devices
    # registered once each: the second run's registrations change nothing and log nothing
    registered = [e["details"]["device_id"] for e in read_events(state)]
    assert registered == devices


def test_k8s_pki_puts_public_material_device_keys_and_the_operator_key_in_the_cluster(
    tmp_path: Path, bin_dir: Path
) -> None:
    # act: twice (idempotent), as an operator re-running it after a change would
    for _ in range(2):
        sh(f"sh {df.K8S / 'pki.sh'}", tmp_path, bin_dir, PKI="pki", DEVICES="3")
    objects = applied(bin_dir)
    # assert: each object the manifests mount, with the keys they read
    pki = tmp_path / "pki"
    tls = objects[("Secret", "fedlora-coordinator-tls")]
    assert set(tls) == {"ca.crt", "server.crt", "server.key", "operator.pub"}
    assert base64.b64decode(tls["server.key"]) == (pki / "tls" / "server.key").read_bytes()
    assert objects[("ConfigMap", "fedlora-ca")]["ca.crt"] == (pki / "tls/ca.crt").read_text()
    registry = yaml.safe_load(objects[("ConfigMap", "fedlora-device-registry")]["devices.json"])
    assert sorted(registry["devices"]) == ["device-0", "device-1", "device-2"]
    device_keys = objects[("Secret", "fedlora-device-keys")]
    assert set(device_keys) == {"device-0.key", "device-1.key", "device-2.key"}
    # the operator key, for the run Job, in a Secret of its own
    operator = objects[("Secret", "fedlora-operator-key")]
    assert set(operator) == {"operator.key"}
    op_key = (pki / "tls" / "operator.key").read_bytes()
    assert base64.b64decode(operator["operator.key"]) == op_key
    # the CA key never leaves the operator's machine; the operator key only in its Secret
    ca_key = (pki / "tls" / "ca.key").read_text().strip()
    op_text = op_key.decode().strip()
    for name, data in objects.items():
        decoded = repr(data) + "".join(
            base64.b64decode(v).decode() for v in data.values() if name[0] == "Secret"
        )
        assert ca_key not in decoded, name
        assert op_text not in decoded or name == ("Secret", "fedlora-operator-key"), name
    assert (bin_dir / "ns").exists()  # the namespace was created when missing


def test_a_pki_made_device_key_is_one_fedlora_device_accepts(tmp_path: Path, bin_dir: Path) -> None:
    """`fedlora device --key` must load what `fedlora keys device` wrote (compose, k8s)."""
    import argparse

    from fedlora.client.device import _check_inputs

    sh("fedlora keys device --out keys --device-id device-0", tmp_path, bin_dir)
    sh("fedlora keys init --data-dir coord", tmp_path, bin_dir)
    data = tmp_path / "device-0.jsonl"
    data.write_text('{"device": "d0", "text": "one note"}\n{"device": "d0", "text": "two"}\n')
    args = argparse.Namespace(
        key=str(tmp_path / "keys" / "device-0.key"),
        data=str(data),
        insecure=False,
        root_cert=str(tmp_path / "coord" / "tls" / "ca.crt"),
        device_id=None,
        budget_epsilon=None,
    )
    _key, _data, _ca, device_id = _check_inputs(args)
    assert device_id == "device-0"  # the id is the key file's name, as compose relies on
