"""fedlora keys: the PKI, device keys Flower accepts, the registry, and the CLI."""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fedlora.auditlog import AUDIT_LOG, local_actor, read_events
from fedlora.cli import main
from fedlora.errors import ConfigError
from fedlora.keys import (
    DeviceRegistry,
    flower_public_key_bytes,
    generate_device_key,
    init_pki,
    key_fingerprint,
    load_private_key,
    load_public_key,
    operator_key_files,
    parse_public_key,
    ssh_fingerprint,
    tls_files,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------ PKI
def test_init_writes_a_ca_signed_server_certificate_for_every_host(tmp_path: Path) -> None:
    files = init_pki(tmp_path, ["coord.example.org", "10.0.0.5", "localhost"])

    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coord.example.org", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    key = serialization.load_pem_private_key(files.key.read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    op_key, op_pub = operator_key_files(tmp_path)
    assert load_private_key(op_key).public_key() == load_public_key(op_pub)
    for private in (files.key, tmp_path / "tls" / "ca.key", op_key):
        assert _mode(private) == 0o600
    assert tls_files(tmp_path) == files


def test_init_defaults_to_localhost_and_loopback(tmp_path: Path) -> None:
    cert = x509.load_pem_x509_certificate(init_pki(tmp_path).cert.read_bytes())

    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_init_refuses_to_replace_keys_without_force(tmp_path: Path) -> None:
    first = init_pki(tmp_path).ca.read_bytes()

    with pytest.raises(ConfigError, match="--force"):
        init_pki(tmp_path)
    assert (tmp_path / "tls" / "ca.crt").read_bytes() == first
    init_pki(tmp_path, force=True)
    assert (tmp_path / "tls" / "ca.crt").read_bytes() != first


def test_tls_files_says_to_run_init_when_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run `fedlora keys init --data-dir .*` first"):
        tls_files(tmp_path)


# ------------------------------------------------------------------ device keys
def test_device_key_pair_is_what_flower_loads(tmp_path: Path) -> None:
    """`flwr supernode register` takes the .pub, `flower-supernode` the .key: both accept ours."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    key_path, pub_path = generate_device_key(tmp_path, "phone-17")

    flower_bytes = try_load_public_key(pub_path)
    assert flower_bytes == flower_public_key_bytes(load_public_key(pub_path))
    args = argparse.Namespace(
        auth_supernode_private_key=str(key_path), auth_supernode_public_key=None
    )
    private, public = _try_setup_client_authentication(args)
    assert isinstance(private.curve, ec.SECP384R1)
    assert flower_public_key_bytes(public) == flower_bytes
    assert _mode(key_path) == 0o600
    assert pub_path.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_device_key_is_not_overwritten_without_force(tmp_path: Path) -> None:
    key_path, _ = generate_device_key(tmp_path, "d1")
    before = key_path.read_bytes()

    with pytest.raises(ConfigError, match=r"already has d1\.key, d1\.pub"):
        generate_device_key(tmp_path, "d1")
    assert key_path.read_bytes() == before


@pytest.mark.parametrize("device_id", ["", "../x", "a b", "-lead", "x" * 65])
def test_bad_device_ids_are_refused(tmp_path: Path, device_id: str) -> None:
    with pytest.raises(ConfigError, match="is not valid"):
        generate_device_key(tmp_path, device_id)


# ------------------------------------------------------------------ registry
def test_registry_round_trip(tmp_path: Path) -> None:
    _, pub1 = generate_device_key(tmp_path / "keys", "d1")
    _, pub2 = generate_device_key(tmp_path / "keys", "d2")
    registry = DeviceRegistry(tmp_path)

    first = registry.register("d1", pub1.read_bytes())
    again = registry.register("d1", pub1.read_text())
    registry.register("d2", load_public_key(pub2))

    assert again == first
    assert sorted(registry.devices()) == ["d1", "d2"]
    flower_bytes = flower_public_key_bytes(load_public_key(pub1))
    assert registry.by_public_key(flower_bytes) == first
    assert registry.by_public_key(pub1.read_bytes()) == first
    assert first.flower_public_key() == flower_bytes
    assert first.fingerprint.startswith("SHA256:") and len(first.fingerprint) == 50
    on_disk = json.loads((tmp_path / "registry" / "devices.json").read_text())
    assert on_disk["devices"]["d1"]["public_key"] == first.public_key
    assert registry.revoke("d1") == first
    assert sorted(registry.devices()) == ["d2"]
    assert registry.by_public_key(flower_bytes) is None


def test_registry_sees_changes_made_by_another_process(tmp_path: Path) -> None:
    _, pub = generate_device_key(tmp_path / "keys", "d1")
    coordinator_view = DeviceRegistry(tmp_path)
    assert coordinator_view.devices() == {}

    DeviceRegistry(tmp_path).register("d1", pub.read_bytes())  # as `fedlora keys register` does

    assert list(coordinator_view.devices()) == ["d1"]
    DeviceRegistry(tmp_path).revoke("d1")
    assert coordinator_view.devices() == {}


def test_registry_refuses_a_second_key_for_an_id_and_a_key_for_two_ids(tmp_path: Path) -> None:
    _, pub1 = generate_device_key(tmp_path / "keys", "d1")
    _, pub2 = generate_device_key(tmp_path / "keys", "d2")
    registry = DeviceRegistry(tmp_path)
    registry.register("d1", pub1.read_bytes())

    with pytest.raises(ConfigError, match=r"already registered with another key.*revoke it first"):
        registry.register("d1", pub2.read_bytes())
    with pytest.raises(ConfigError, match="already registered as device d1"):
        registry.register("d3", pub1.read_bytes())
    with pytest.raises(ConfigError, match="reserved for the operator"):
        registry.register("operator", pub2.read_bytes())
    with pytest.raises(ConfigError, match=r"'d9' is not registered .*registered: d1"):
        registry.revoke("d9")
    assert list(registry.devices()) == ["d1"]


def test_key_fingerprint_is_sha256_of_the_der_public_key(tmp_path: Path) -> None:
    _, pub = generate_device_key(tmp_path, "d1")
    key = load_public_key(pub)
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    assert key_fingerprint(key) == "sha256:" + hashlib.sha256(der).hexdigest()
    assert ssh_fingerprint(key).startswith("SHA256:") and len(ssh_fingerprint(key)) == 50


def test_registry_changes_are_audited_with_actor_device_and_fingerprints(tmp_path: Path) -> None:
    _, pub = generate_device_key(tmp_path / "keys", "d1")
    key = load_public_key(pub)
    registry = DeviceRegistry(tmp_path)

    registry.register("d1", pub.read_bytes())
    registry.register("d1", pub.read_bytes())  # no change: nothing to log
    registry.revoke("d1", actor="someone (key sha256:00)")
    with pytest.raises(ConfigError):
        registry.revoke("d1")  # refused: nothing to log

    events = read_events(tmp_path)
    assert [(e["action"], e["actor"]) for e in events] == [
        ("key.register", local_actor()),
        ("key.revoke", "someone (key sha256:00)"),
    ]
    details = {
        "device_id": "d1",
        "fingerprint": key_fingerprint(key),
        "ssh_fingerprint": ssh_fingerprint(key),
    }
    assert [e["details"] for e in events] == [details, details]


def test_a_registration_the_audit_log_cannot_record_says_so(tmp_path: Path) -> None:
    _, pub = generate_device_key(tmp_path / "keys", "d1")
    (tmp_path / AUDIT_LOG).write_bytes(b'{"seq": 1, "cut off')  # a torn last line

    with pytest.raises(ConfigError, match=r"^device d1 is registered, but the audit log did not"):
        DeviceRegistry(tmp_path).register("d1", pub.read_bytes())


def test_keys_that_flower_cannot_use_are_refused(tmp_path: Path) -> None:
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    rsa_line = rsa_pub.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    k1_pem = (
        ec.generate_private_key(ec.SECP256K1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    with pytest.raises(ConfigError, match="is an RSA key, not an EC key"):
        parse_public_key(rsa_line, "rsa.pub")
    with pytest.raises(ConfigError, match="curve secp256k1, not a NIST curve"):
        parse_public_key(k1_pem, "k1.pem")
    with pytest.raises(ConfigError, match="not a public key in OpenSSH, PEM or DER format"):
        parse_public_key(b"ecdsa-sha2-nistp384 AAAAnot-base64", "bad.pub")


# ------------------------------------------------------------------ CLI
def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fedlora: error: "), err
    assert "Traceback" not in err
    return err


def test_cli_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, keys = str(tmp_path / "coord"), str(tmp_path / "keys")

    assert main(["keys", "init", "--data-dir", data, "--host", "coord.lan"]) == 0
    assert main(["keys", "device", "--out", keys, "--device-id", "d1"]) == 0
    pub = str(Path(keys) / "d1.pub")
    assert (
        main(["keys", "register", "--data-dir", data, "--device-id", "d1", "--public-key", pub])
        == 0
    )
    assert (
        main(["keys", "register", "--data-dir", data, "--device-id", "d1", "--public-key", pub])
        == 0
    )
    capsys.readouterr()
    assert main(["keys", "list", "--data-dir", data, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert main(["keys", "revoke", "--data-dir", data, "--device-id", "d1"]) == 0
    assert main(["keys", "list", "--data-dir", data]) == 0

    assert list(listed) == ["d1"]
    assert listed["d1"]["fingerprint"] in capsys.readouterr().out
    assert DeviceRegistry(data).devices() == {}
    assert [e["action"] for e in read_events(data)] == ["key.register", "key.revoke"]


def test_cli_audit_prints_one_line_per_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # arrange: a register and a revoke through the CLI
    data, keys = str(tmp_path / "coord"), str(tmp_path / "keys")
    main(["keys", "device", "--out", keys, "--device-id", "d1"])
    pub = str(Path(keys) / "d1.pub")
    main(["keys", "register", "--data-dir", data, "--device-id", "d1", "--public-key", pub])
    main(["keys", "revoke", "--data-dir", data, "--device-id", "d1"])
    fp = key_fingerprint(load_public_key(pub))
    capsys.readouterr()

    # act
    assert main(["keys", "audit", "--data-dir", data]) == 0
    text = capsys.readouterr().out
    assert main(["keys", "audit", "--data-dir", data, "--json"]) == 0
    as_json = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    # assert
    lines = text.splitlines()
    assert len(lines) == 2
    assert "  key.register  " in lines[0] and "  key.revoke    " in lines[1]
    for line in lines:
        assert f"  {local_actor()}  device_id=d1 fingerprint={fp} ssh_fingerprint=SHA256:" in line
    assert as_json == read_events(data)


def test_cli_audit_of_an_empty_and_a_broken_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, keys = tmp_path / "coord", tmp_path / "keys"
    assert main(["keys", "audit", "--data-dir", str(data)]) == 0
    assert capsys.readouterr().out == f"no audit events in {data / AUDIT_LOG}\n"
    for device_id in ("d1", "d2"):
        _, pub = generate_device_key(keys, device_id)
        DeviceRegistry(data).register(device_id, pub.read_bytes())
    log = data / AUDIT_LOG
    log.write_bytes(log.read_bytes().replace(b'"device_id":"d1"', b'"device_id":"d9"'))
    capsys.readouterr()

    assert main(["keys", "audit", "--data-dir", str(data)]) == 2

    err = _one_line_error(capsys)
    assert "audit log broken at line 2: it does not follow line 1" in err


def test_cli_errors_are_one_line_with_an_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = str(tmp_path / "coord")
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key\n")
    assert main(["keys", "init", "--data-dir", data]) == 0
    capsys.readouterr()

    assert main(["keys", "init", "--data-dir", data]) == 2
    assert "--force" in _one_line_error(capsys)
    assert (
        main(
            ["keys", "register", "--data-dir", data, "--device-id", "d1", "--public-key", str(bad)]
        )
        == 2
    )
    assert "bad.pub is not a public key" in _one_line_error(capsys)
    missing = str(tmp_path / "nope.pub")
    assert (
        main(["keys", "register", "--data-dir", data, "--device-id", "d1", "--public-key", missing])
        == 2
    )
    assert "cannot read public key" in _one_line_error(capsys)
    assert main(["keys", "revoke", "--data-dir", data, "--device-id", "ghost"]) == 2
    assert "'ghost' is not registered" in _one_line_error(capsys)


def test_cli_keys_without_an_action_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys"]) == 2
    assert "register" in capsys.readouterr().out
