"""Keys of a deployment: the coordinator's TLS PKI, device keys, the registry, signed calls.

One data directory holds the coordinator's side::

    DIR/tls/ca.crt, ca.key            self-signed CA; devices trust ca.crt
    DIR/tls/server.crt, server.key    the coordinator's certificate, signed by the CA
    DIR/tls/operator.key, .pub        the operator's key: signs operator-only calls
    DIR/registry/devices.json         device id → OpenSSH public key (who may call)
    DIR/audit.jsonl                   who registered or revoked a key, started or stopped
                                      a run (``fedlora.auditlog``)

and each device holds its own EC P-384 key pair (``fedlora keys device``), the one
its Flower SuperNode authenticates with and that signs its calls to fedlora's
services. ``material`` reads and writes keys, ``pki`` makes the certificates,
``registry`` keeps the device list, ``signing`` signs and checks calls; the CLI
is ``fedlora.cli.keys``. Keys have two fingerprints: :func:`key_fingerprint`
(``sha256:<hex>`` of the DER public key, used in the audit log) and
:func:`ssh_fingerprint` (``SHA256:<base64>``, as ``ssh-keygen -l`` prints it,
used in the registry).
"""

from fedlora.keys.material import (
    check_device_id,
    flower_public_key_bytes,
    generate_device_key,
    generate_key,
    key_fingerprint,
    load_private_key,
    load_public_key,
    openssh_public_key,
    parse_public_key,
    ssh_fingerprint,
)
from fedlora.keys.pki import DEFAULT_HOSTS, TlsFiles, init_pki, operator_key_files, tls_files
from fedlora.keys.registry import DeviceRegistry, RegisteredDevice
from fedlora.keys.signing import (
    MAX_CLOCK_SKEW_S,
    METADATA_DEVICE,
    METADATA_NONCE,
    METADATA_SIGNATURE,
    METADATA_TIMESTAMP,
    OPERATOR_ID,
    call_payload,
    new_nonce,
    sign_call,
    valid_nonce,
    verify_call,
)

__all__ = [
    "DEFAULT_HOSTS",
    "MAX_CLOCK_SKEW_S",
    "METADATA_DEVICE",
    "METADATA_NONCE",
    "METADATA_SIGNATURE",
    "METADATA_TIMESTAMP",
    "OPERATOR_ID",
    "DeviceRegistry",
    "RegisteredDevice",
    "TlsFiles",
    "call_payload",
    "check_device_id",
    "flower_public_key_bytes",
    "generate_device_key",
    "generate_key",
    "init_pki",
    "key_fingerprint",
    "load_private_key",
    "load_public_key",
    "new_nonce",
    "openssh_public_key",
    "operator_key_files",
    "parse_public_key",
    "sign_call",
    "ssh_fingerprint",
    "tls_files",
    "valid_nonce",
    "verify_call",
]
