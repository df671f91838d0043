"""``fedlora keys``: the coordinator's TLS PKI, device keys and the device registry.

A deployment's keys in the order they are needed::

    fedlora keys init --data-dir DIR --host coord.example.org    # once, on the coordinator
    fedlora keys device --out keys --device-id phone-17          # once per device
    fedlora keys register --data-dir DIR --device-id phone-17 --public-key keys/phone-17.pub
    fedlora keys list --data-dir DIR
    fedlora keys revoke --data-dir DIR --device-id phone-17
    fedlora keys audit --data-dir DIR                            # who changed what, when

Every handler returns an exit code; errors are :class:`~fedlora.errors.ConfigError`,
printed by ``fedlora.cli`` as one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

EPILOG = """\
first time, on the coordinator:
  fedlora keys init --data-dir /srv/fedlora --host coord.example.org --host 10.0.0.5
per device (the private key stays on the device; copy DEVICE.pub to the coordinator):
  fedlora keys device --out keys --device-id phone-17
  fedlora keys register --data-dir /srv/fedlora --device-id phone-17 --public-key phone-17.pub
then give the device DIR/tls/ca.crt to trust the coordinator's certificate.
"""


def add_keys_parser(sub: Any) -> None:
    """Add ``keys`` and its subcommands to the CLI's subparsers."""
    keys = sub.add_parser(
        "keys",
        help="TLS certificates, device keys and the device registry of a deployment",
        description=(
            "Create the coordinator's certificates and operator key, create device keys, and "
            "keep the registry of devices allowed to call the coordinator. Devices use NIST "
            "P-384 keys: the same key authenticates the device's Flower SuperNode and signs "
            "its calls to fedlora's model and privacy services."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    keys.set_defaults(func=lambda args: _missing_action(keys))
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION")

    init = actions.add_parser(
        "init",
        help="create the coordinator's CA, server certificate and operator key",
        description=(
            "Create DIR/tls/: a self-signed CA (ca.crt, ca.key), a server certificate signed by "
            "it (server.crt, server.key) valid for every --host, and the operator key pair "
            "(operator.key, operator.pub) that signs operator-only calls such as the fleet "
            "privacy report. Devices need ca.crt. Private keys are written 0600."
        ),
    )
    init.add_argument(
        "--data-dir", required=True, type=Path, metavar="DIR", help="the coordinator's data dir"
    )
    init.add_argument(
        "--host",
        action="append",
        metavar="NAME",
        help="a DNS name or IP address devices reach the coordinator at; repeat for several "
        "(default: localhost and 127.0.0.1)",
    )
    init.add_argument(
        "--force",
        action="store_true",
        help="replace existing keys (every device then needs the new ca.crt)",
    )
    init.set_defaults(func=cmd_init)

    device = actions.add_parser(
        "device",
        help="create a device's key pair (ID.key, ID.pub)",
        description=(
            "Write OUT/ID.key (EC P-384 private key in OpenSSH format, 0600: what "
            "`flower-supernode --auth-supernode-private-key` and `fedlora device --key` load) "
            "and OUT/ID.pub (OpenSSH public key: what `fedlora keys register` and "
            "`flwr supernode register` take). Keep ID.key on the device."
        ),
    )
    device.add_argument("--out", required=True, type=Path, metavar="DIR", help="where to write")
    device.add_argument(
        "--device-id",
        required=True,
        metavar="ID",
        help="the device's id: 1-64 letters, digits, '.', '_' or '-' (also the file names)",
    )
    device.add_argument("--force", action="store_true", help="replace an existing key pair")
    device.set_defaults(func=cmd_device)

    register = actions.add_parser(
        "register",
        help="allow a device to call the coordinator",
        description=(
            "Add a device and its public key to DIR/registry/devices.json. A running "
            "coordinator picks the change up at the device's next call. Registering the same "
            "id with the same key again does nothing; another key needs `revoke` first."
        ),
    )
    register.add_argument(
        "--data-dir", required=True, type=Path, metavar="DIR", help="the coordinator's data dir"
    )
    register.add_argument(
        "--device-id", required=True, metavar="ID", help="the id the device calls with"
    )
    register.add_argument(
        "--public-key", required=True, type=Path, metavar="FILE", help="the device's ID.pub"
    )
    register.set_defaults(func=cmd_register)

    listing = actions.add_parser(
        "list",
        help="show the registered devices",
        description="Print every registered device: id, key fingerprint, when registered.",
    )
    listing.add_argument(
        "--data-dir", required=True, type=Path, metavar="DIR", help="the coordinator's data dir"
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=cmd_list)

    revoke = actions.add_parser(
        "revoke",
        help="remove a device from the registry",
        description=(
            "Remove a device from DIR/registry/devices.json; its calls to fedlora's services "
            "are refused from the next one on."
        ),
    )
    revoke.add_argument(
        "--data-dir", required=True, type=Path, metavar="DIR", help="the coordinator's data dir"
    )
    revoke.add_argument("--device-id", required=True, metavar="ID", help="the device to remove")
    revoke.set_defaults(func=cmd_revoke)

    audit = actions.add_parser(
        "audit",
        help="show the coordinator's audit log (key and run events)",
        description=(
            "Print DIR/audit.jsonl, one line per event: when, what (run.start, run.resume, "
            "run.stop, key.register, key.revoke), who authorised it (a signed caller and its "
            "key's fingerprint, or the local user who ran `fedlora keys`) and the details. "
            "The log's hash chain is checked first: an edited or removed line is reported "
            "(exit code 2) instead of printing the log."
        ),
    )
    audit.add_argument(
        "--data-dir", required=True, type=Path, metavar="DIR", help="the coordinator's data dir"
    )
    audit.add_argument("--json", action="store_true", help="one JSON object per event")
    audit.set_defaults(func=cmd_audit)


def _missing_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def cmd_init(args: argparse.Namespace) -> int:
    from fedlora.keys import DEFAULT_HOSTS, init_pki, operator_key_files

    hosts = args.host or list(DEFAULT_HOSTS)
    files = init_pki(args.data_dir, hosts, force=args.force)
    op_key, _ = operator_key_files(args.data_dir)
    print(f"fedlora: wrote CA {files.ca}, server certificate {files.cert} for {', '.join(hosts)}")
    print(f"fedlora: operator key {op_key}; give devices {files.ca} to trust the coordinator")
    return 0


def cmd_device(args: argparse.Namespace) -> int:
    from fedlora.keys import generate_device_key, load_public_key, ssh_fingerprint

    key_path, pub_path = generate_device_key(args.out, args.device_id, force=args.force)
    fp = ssh_fingerprint(load_public_key(pub_path))
    print(f"fedlora: wrote {key_path} (keep it on the device) and {pub_path} ({fp})")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from fedlora.keys import DeviceRegistry, load_public_key

    registry = DeviceRegistry(args.data_dir)
    key = load_public_key(args.public_key)
    known = registry.get(args.device_id)
    device = registry.register(args.device_id, key, source=str(args.public_key))
    if known is not None:
        print(f"fedlora: device {device.device_id} is already registered with this key")
    else:
        print(f"fedlora: registered device {device.device_id} ({device.fingerprint})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from fedlora.keys import DeviceRegistry

    devices = DeviceRegistry(args.data_dir).devices()
    if args.json:
        payload = {d: devices[d].to_dict() for d in sorted(devices)}
        print(json.dumps(payload, indent=2, sort_keys=True))
        return 0
    if not devices:
        print(f"no devices registered in {args.data_dir}")
        return 0
    width = max(len("DEVICE"), *(len(d) for d in devices))
    print(f"{'DEVICE':<{width}}  {'FINGERPRINT':<50}  REGISTERED")
    for device_id in sorted(devices):
        d = devices[device_id]
        print(f"{device_id:<{width}}  {d.fingerprint:<50}  {d.registered_at}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from fedlora.keys import DeviceRegistry

    device = DeviceRegistry(args.data_dir).revoke(args.device_id)
    print(f"fedlora: revoked device {device.device_id} ({device.fingerprint})")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from fedlora.auditlog import format_event, log_path, read_events

    events = read_events(args.data_dir)  # a broken chain is a ConfigError: one line, exit 2
    if args.json:
        for event in events:
            print(json.dumps(event, sort_keys=True))
        return 0
    if not events:
        print(f"no audit events in {log_path(args.data_dir)}")
        return 0
    for event in events:
        print(format_event(event))
    return 0
