"""``fedlora models list|pull``, ``fedlora budget``, ``fedlora fleet-report``.

(``fedlora models import-gguf|catalog``, which work locally, are in
:mod:`fedlora.cli.model_import`.)

What a device (or the operator) asks a coordinator's fedlora services, the
ModelService and PrivacyService on port P+2 of ``--coordinator HOST[:P]``::

    fedlora models list --coordinator coord:9092 --key keys/phone-17.key --root-cert ca.crt
    fedlora models pull run-a/int8 --coordinator coord:9092 --key keys/phone-17.key \\
        --root-cert ca.crt --out models
    fedlora budget --coordinator coord:9092 --key keys/phone-17.key --root-cert ca.crt
    fedlora fleet-report --coordinator coord:9092 --key DIR/tls/operator.key --root-cert ca.crt

Every call is signed with ``--key`` as ``--device-id`` (default: the key file's
name without suffix, so ``operator.key`` signs as the operator) through
:class:`fedlora.client.service_client.DeviceServiceClient`. Errors are
:class:`~fedlora.errors.FedloraError`\\ s, printed by ``fedlora.cli`` as one line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fedlora.argtypes import positive_float
from fedlora.errors import ConfigError, ExportError
from fedlora.export.manifest import sha256_file

if TYPE_CHECKING:
    from fedlora.client.service_client import DeviceServiceClient, RemoteFile, RemoteModel

DEFAULT_TIMEOUT_S = 20.0
STAGING = ".fedlora-pull"  # under --out: verified files wait here until the whole set is in

_CONNECTION = """\
The coordinator (HOST[:P], as `fedlora device` takes it) serves these on port P+2;
--root-cert is its DIR/tls/ca.crt, and --key signs every call.
"""

MODELS_EPILOG = f"""\
examples:
  fedlora models list --coordinator coord.example.org --key keys/phone-17.key --root-cert ca.crt
  fedlora models pull run-a/int8 --coordinator coord.example.org --key keys/phone-17.key \\
      --root-cert ca.crt --out models

{_CONNECTION}"""

BUDGET_EPILOG = f"""\
examples:
  fedlora budget --coordinator coord.example.org --key keys/phone-17.key --root-cert ca.crt
  fedlora budget --coordinator coord.example.org --key /srv/fedlora/tls/operator.key \\
      --root-cert ca.crt --device phone-17             # the operator asks about a device

{_CONNECTION}"""

FLEET_EPILOG = f"""\
example:
  fedlora fleet-report --coordinator coord.example.org --key /srv/fedlora/tls/operator.key \\
      --root-cert /srv/fedlora/tls/ca.crt --run run-a --out run-a-privacy.json

{_CONNECTION}"""


# ------------------------------------------------------------------ parsers
def _add_connection(parser: argparse.ArgumentParser, *, operator: bool = False) -> None:
    parser.add_argument(
        "--coordinator",
        required=True,
        metavar="HOST[:P]",
        help="the coordinator's address as `fedlora device` takes it; its fedlora services "
        "listen on P+2 (P default 9092)",
    )
    parser.add_argument(
        "--key",
        required=True,
        metavar="OPERATOR_KEY" if operator else "KEY",
        help="the operator's DIR/tls/operator.key"
        if operator
        else "the private key that signs the calls: the device's ID.key from `fedlora keys "
        "device` (the operator: DIR/tls/operator.key)",
    )
    trust = parser.add_mutually_exclusive_group(required=True)
    trust.add_argument(
        "--root-cert", metavar="CA", help="the coordinator's CA certificate (DIR/tls/ca.crt)"
    )
    trust.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC, for a coordinator started with --insecure: local trials only "
        "(calls are still signed)",
    )
    parser.add_argument(
        "--device-id",
        metavar="ID",
        help="the id the calls are signed as (default: the key file's name without suffix, "
        "e.g. phone-17 for phone-17.key, operator for operator.key)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help="seconds to wait to connect and for each answer, not for a whole download "
        "(default %(default)g)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show tracebacks instead of one-line errors"
    )


def _add_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=["table", "json"],
        default="table",
        help="print a table (default) or JSON for scripts",
    )


def add_service_parsers(sub: Any) -> None:
    """Add ``models``, ``budget`` and ``fleet-report`` to the CLI's subparsers."""
    raw = argparse.RawDescriptionHelpFormatter
    models = sub.add_parser(
        "models",
        help="models a coordinator released (list, pull); real models for --model "
        "(import-gguf, catalog)",
        description=(
            "The coordinator releases an exported artefact (RUN/NAME, e.g. run-a/int8) once it "
            "passed its quality gate. `list` shows them; `pull` downloads one to a device. "
            "`import-gguf` turns a GGUF file into a checkpoint directory for --model; "
            "`catalog` lists the named models --model accepts."
        ),
        epilog=MODELS_EPILOG,
        formatter_class=raw,
    )
    models.set_defaults(func=lambda args: _missing_action(models))
    actions = models.add_subparsers(dest="models_command", metavar="ACTION")

    listing = actions.add_parser(
        "list",
        help="show the released models",
        description=(
            "Show every released model: version, format, quantization, total size, each file "
            "with the start of its SHA-256, and the quality the export measured against its "
            "reference (KL divergence, top-1 agreement). --format json has full digests."
        ),
        epilog=MODELS_EPILOG,
        formatter_class=raw,
    )
    _add_connection(listing)
    _add_format(listing)
    listing.set_defaults(func=cmd_models_list)

    pull = actions.add_parser(
        "pull",
        help="download a released model, verified and resumable",
        description=(
            "Download every file of a released model (or only --path) to OUT/<file path>. "
            "Each file is checked against the size and SHA-256 the coordinator lists before "
            f"anything is installed; until then files wait under OUT/{STAGING}/. An "
            "interrupted download resumes where it stopped when the command is run again, "
            "and files already installed and intact are not fetched again."
        ),
        epilog=MODELS_EPILOG,
        formatter_class=raw,
    )
    # dest is not "version": that is the top-level --version flag's
    pull.add_argument("model_version", metavar="VERSION", help="a version from `models list`")
    pull.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="where the files are installed"
    )
    pull.add_argument(
        "--path",
        metavar="FILE",
        help="only this file of the model (a path from `models list`)",
    )
    _add_connection(pull)
    pull.set_defaults(func=cmd_models_pull)

    from fedlora.cli.model_import import add_local_model_parsers

    add_local_model_parsers(actions)

    budget = sub.add_parser(
        "budget",
        help="a device's spent and remaining privacy budget (ε), as the coordinator accounts it",
        description=(
            "Ask the coordinator how much of its privacy budget the calling device has spent: "
            "ε composed over every run's ledger, the budget and δ of the latest run it trained "
            "in, and the accountant. A device may only ask about itself; the operator "
            "(--key DIR/tls/operator.key) names the device with --device. Devices also keep "
            "their own ledger and refuse to train past their budget whatever this says."
        ),
        epilog=BUDGET_EPILOG,
        formatter_class=raw,
    )
    _add_connection(budget)
    budget.add_argument(
        "--device", metavar="DEVICE", help="the device to ask about (operator key only)"
    )
    _add_format(budget)
    budget.set_defaults(func=cmd_budget)

    fleet = sub.add_parser(
        "fleet-report",
        help="the privacy report of a run on the coordinator (operator only)",
        description=(
            "Fetch the privacy report the coordinator computes from a run's ledger (ε per "
            "device and round, fleet totals) as JSON: of --run, or of the run whose ledger "
            "changed last. Signed with the operator's key; devices are refused."
        ),
        epilog=FLEET_EPILOG,
        formatter_class=raw,
    )
    _add_connection(fleet, operator=True)
    fleet.add_argument("--run", metavar="NAME", help="the run (default: the latest)")
    fleet.add_argument(
        "--out", type=Path, metavar="FILE", help="write the JSON here instead of printing it"
    )
    fleet.set_defaults(func=cmd_fleet_report)


def _missing_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


# ------------------------------------------------------------------ connecting
def service_target(coordinator: str) -> str:
    """``HOST:P+2`` for ``HOST[:P]``, IPv6 literals in brackets as gRPC wants them."""
    from fedlora.addresses import CoordinatorAddress

    addr = CoordinatorAddress.parse(coordinator)
    host = f"[{addr.host}]" if ":" in addr.host else addr.host
    return f"{host}:{addr.port + 2}"


@contextlib.contextmanager
def connect(args: argparse.Namespace) -> Iterator[DeviceServiceClient]:
    """A connected, signing client for the command's connection arguments, closed on exit."""
    from fedlora.client.service_client import DeviceServiceClient

    key, device_id = _identity(args)
    ca = None if args.insecure else Path(args.root_cert)
    if ca is not None and not ca.is_file():
        raise ConfigError(
            f"CA certificate {ca} does not exist: copy the coordinator's DIR/tls/ca.crt"
        )
    target = service_target(args.coordinator)
    client = DeviceServiceClient(target, ca, device_id, key, timeout=args.timeout)
    try:
        client.wait_ready(args.timeout)
        yield client
    finally:
        client.close()


def _identity(args: argparse.Namespace) -> tuple[Path, str]:
    """The key file and the id calls are signed as (the key's stem unless --device-id)."""
    from fedlora.keys import check_device_id

    key = Path(args.key)
    if not key.is_file():
        raise ConfigError(
            f"key {key} does not exist: a device's comes from `fedlora keys device`, the "
            "operator's is the coordinator's DIR/tls/operator.key"
        )
    return key, check_device_id(args.device_id or key.stem)


# ------------------------------------------------------------------ models
def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _quality(model: RemoteModel, key: str, fmt: str) -> str:
    value = model.quality.get(key)
    return "-" if value is None else format(value, fmt)


def _models_table(models: list[RemoteModel]) -> list[str]:
    header = ("VERSION", "FORMAT", "QUANT", "SIZE", "KL", "TOP-1", "FILE", "SHA256")
    rows: list[tuple[str, ...]] = []
    for m in models:
        head = (
            m.version,
            m.format,
            m.quantization,
            _size(m.size_bytes),
            _quality(m, "kl", ".2e"),
            _quality(m, "top1_agreement", ".4f"),
        )
        for i, f in enumerate(m.files):
            rows.append((*(head if i == 0 else ("",) * len(head)), f.path, f.sha256[:12]))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in (header, *rows)
    ]


def cmd_models_list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        models = client.list_models()
    if args.format == "json":
        print(json.dumps([dataclasses.asdict(m) for m in models], indent=2))
        return 0
    if not models:
        print(f"the coordinator at {client.address} has released no model yet")
        return 0
    print("\n".join(_models_table(models)))
    return 0


def _intact(path: Path, entry: RemoteFile) -> bool:
    """Whether ``path`` is already exactly the listed file."""
    return (
        path.is_file()
        and path.stat().st_size == entry.size_bytes
        and sha256_file(path) == entry.sha256
    )


def _local_path(root: Path, file_path: str) -> Path:
    """Where a listed file goes under ``root``: the client's one rule for safe paths."""
    from fedlora.client.service_client import _check_relative

    try:
        rel = _check_relative(file_path)
    except ConfigError:
        raise ExportError(
            f"the coordinator lists an unsafe file path {file_path!r}: not fetched"
        ) from None
    return root.joinpath(*rel.parts)


def _choose(models: list[RemoteModel], version: str, path: str | None) -> tuple[RemoteFile, ...]:
    model = next((m for m in models if m.version == version), None)
    if model is None:
        known = ", ".join(m.version for m in models) or "none"
        raise ExportError(
            f"the coordinator has no released model {version!r} (released: {known}); "
            "`fedlora models list` shows them"
        )
    if path is None:
        return model.files
    chosen = tuple(f for f in model.files if f.path == path)
    if not chosen:
        raise ExportError(
            f"model {version} has no file {path!r} (its files: "
            f"{', '.join(f.path for f in model.files)})"
        )
    return chosen


def cmd_models_pull(args: argparse.Namespace) -> int:
    out: Path = args.out
    staging = out / STAGING / quote(args.model_version, safe="")
    try:
        with connect(args) as client:
            files = _choose(client.list_models(), args.model_version, args.path)
            fetched = _fetch(client, args.model_version, files, out, staging)
        # Every file is in and verified: only now install them.
        for entry, staged, dest in fetched:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, dest)
            print(
                f"fedlora: installed {dest} ({_size(entry.size_bytes)}, sha256 "
                f"{entry.sha256[:12]}… verified)"
            )
    except OSError as err:
        where = err.filename or out
        raise ExportError(f"cannot write {where}: {err.strerror or err}") from None
    _remove_empty_dirs(out / STAGING)  # keeps any other download's .part for its resume
    total = sum(e.size_bytes for e in files)
    print(f"fedlora: {args.model_version}: {len(files)} file(s), {_size(total)} in {out}")
    return 0


def _remove_empty_dirs(root: Path) -> None:
    for directory, _, _ in sorted(os.walk(root), key=lambda w: len(w[0]), reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def _fetch(
    client: DeviceServiceClient,
    version: str,
    files: tuple[RemoteFile, ...],
    out: Path,
    staging: Path,
) -> list[tuple[RemoteFile, Path, Path]]:
    """Download into ``staging`` each file not already intact under ``out``; return
    ``(entry, staged file, where it goes)`` for those fetched, each one verified."""
    fetched = []
    for entry in files:
        dest = _local_path(out, entry.path)
        if _intact(dest, entry):
            print(f"fedlora: {dest} is already installed and intact (sha256 {entry.sha256[:12]}…)")
            continue
        # The client checks size and SHA-256 before the file appears in staging.
        staged = client.download(version, entry.path, staging)
        fetched.append((entry, staged, dest))
    return fetched


# ------------------------------------------------------------------ privacy
def cmd_budget(args: argparse.Namespace) -> int:
    from fedlora.keys import OPERATOR_ID

    if _identity(args)[1] == OPERATOR_ID and not args.device:
        raise ConfigError("the operator asks about a device: add --device DEVICE")
    with connect(args) as client:
        budget = client.budget(args.device)
    if args.format == "json":
        print(json.dumps(dataclasses.asdict(budget), indent=2))
        return 0
    trained = (
        f"{budget.rounds_trained} round(s) in {', '.join(budget.runs)}"
        if budget.runs
        else "no rounds yet"
    )
    print(f"device {budget.device_id}")
    print("  record-level (unit: one training record; DP-SGD)")
    print(f"  ε spent      {budget.epsilon_spent:.4f} of {budget.epsilon_budget:g}")
    print(f"  ε remaining  {budget.epsilon_remaining:.4f}")
    print(f"  δ            {budget.delta:g}")
    print(f"  accountant   {budget.accountant}")
    print(f"  trained      {trained}")
    dl = budget.device_level
    if dl is not None:
        rounds = f"{dl.rounds} round(s) in {', '.join(dl.runs)}" if dl.runs else "no rounds yet"
        print("  device-level (unit: the device's whole data; distributed discrete Gaussian)")
        print(f"  ε spent      {dl.epsilon_spent:.4f} of {dl.epsilon_budget:g}")
        print(f"  ε remaining  {dl.epsilon_remaining:.4f}")
        print(f"  δ            {dl.delta:g}")
        print(f"  accountant   {dl.accountant}")
        print(f"  in sums      {rounds}")
    trained_in = {*budget.runs, *(dl.runs if dl is not None else ())}
    source = "latest run it trained in" if budget.budget_run in trained_in else "latest run"
    print(f"  budget from  {budget.budget_run} ({source}; privacy.unit {budget.policy_unit})")
    return 0


def cmd_fleet_report(args: argparse.Namespace) -> int:
    with connect(args) as client:
        run, report = client.fleet_report(args.run)
    if args.out is None:
        print(report)
        return 0
    out: Path = args.out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(report + "\n", encoding="utf-8")
        os.replace(tmp, out)
    except OSError as err:
        raise ConfigError(f"cannot write {out}: {err.strerror or err}") from None
    print(f"fedlora: wrote the privacy report of run {run} to {out}")
    return 0
