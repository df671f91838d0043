"""``fedlora export RUN_DIR``: export a finished run's adapter for a device class.

:func:`export_run_dir` rebuilds what the coordinator exported with — the run's
base model (or ``--model``), its adapter, and the coordinator's held-out text
encoded the same way — and hands them to :func:`fedlora.export.export_run`, so
a re-export measures the same tokens the simulation's own export did.
``add_export_parser`` / ``cmd_export`` are the command-line front door.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.errors import ConfigError, ModelError
from fedlora.export.profiles import PROFILES, QUANTIZATIONS, format_name, profile_formats

if TYPE_CHECKING:
    import torch

RUN_CONFIG = "config.json"
_RUN_ONLY_KEYS = ("resolved", "versions")

EXPORT_EPILOG = """\
profiles (device class → format, quantization):
{profiles}

examples:
  fedlora export runs/demo                          # the formats the run was configured with
  fedlora export runs/demo --profile phone-low      # GGUF Q4_K_M for llama.cpp
  fedlora export runs/demo --format gguf --quant q8_0
  fedlora export runs/demo --format safetensors --quant int8 --model ./my-llama
"""


def run_config(run_dir: Path) -> Any:
    """The run's resolved config (``RUN_DIR/config.json`` without its run-only keys)."""
    from fedlora.config import FedloraConfig

    file = run_dir / RUN_CONFIG
    if not file.is_file():
        raise ConfigError(f"{run_dir} is not a fedlora run directory (no {RUN_CONFIG})")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{file} is not readable JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} is not a fedlora config")
    for key in _RUN_ONLY_KEYS:
        data.pop(key, None)
    return FedloraConfig.from_dict(data)


def _recorded_base_fingerprint(run_dir: Path) -> str | None:
    """The fingerprint of the base the run's previous export was made from, if any."""
    from fedlora.errors import ExportError
    from fedlora.export.manifest import read_manifest

    try:
        return str(read_manifest(run_dir / "export")["base_model"]["fingerprint"]["sha256"])
    except (ExportError, KeyError, TypeError):
        return None


def check_base_matches(run_dir: Path, base: Path) -> None:
    """Refuse a base that is not the checkpoint the run's last export recorded.

    Same-shaped but different weights would merge without complaint (the shape
    check in :func:`fedlora.export.merge.load_peft_model` cannot see them).
    """
    from fedlora.model import model_fingerprint

    recorded = _recorded_base_fingerprint(run_dir)
    if recorded is not None and model_fingerprint(base) != recorded:
        raise ModelError(
            f"base model {base} is not the one the adapter in {run_dir} was exported with "
            f"(fingerprint {recorded[:12]}…): pass the base the run was trained on"
        )


def run_inputs(
    run_dir: str | Path, model: str | Path | None = None
) -> tuple[Any, Path, Path, torch.Tensor, torch.Tensor]:
    """``(config, base, adapter, heldout_ids, heldout_mask)`` of a finished run, checked.

    The held-out text is the coordinator's eval set, encoded as the coordinator did.
    """
    from fedlora import runtime
    from fedlora.export.merge import check_adapter_dir

    root = Path(run_dir)
    cfg = run_config(root)
    adapter = check_adapter_dir(root / "adapter")
    if model is not None:
        if not (Path(model) / "config.json").is_file():
            raise ModelError(f"--model {model} is not a model directory (no config.json)")
        cfg = cfg.replace(model={"path": str(model)})
    base = runtime.resolve_model_path(cfg)
    check_base_matches(root, base)
    ids, mask = runtime.encoded(cfg, "server-eval", runtime.fleet(cfg).server_eval)
    return cfg, base, adapter, ids, mask


def export_run_dir(
    run_dir: str | Path, formats: Sequence[str] | None = None, model: str | Path | None = None
) -> dict[str, Any]:
    """Export ``RUN_DIR/adapter`` into ``RUN_DIR/export``; ``formats=None`` is the run's config."""
    from fedlora.export.pipeline import export_run

    cfg, base, adapter, ids, mask = run_inputs(run_dir, model)
    names = tuple(cfg.export.formats) if formats is None else tuple(formats)
    return export_run(base, adapter, Path(run_dir) / "export", ids, mask, formats=names)


def resolve_cli_formats(args: argparse.Namespace) -> tuple[str, ...] | None:
    """Format names from ``--profile`` or ``--format``/``--quant``; None: the run's config."""
    if args.profile and (args.format or args.quant):
        raise ConfigError("use either --profile or --format/--quant, not both")
    if args.profile:
        return profile_formats(args.profile)
    if args.quant and not args.format:
        raise ConfigError("--quant needs --format (gguf or safetensors)")
    if args.format:
        name = format_name(args.format, args.quant)
        return (name,) if name else ()
    return None


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``fedlora export`` to the CLI's subparsers; returns the new parser."""
    table = "\n".join(
        f"  {p.name:<11} {p.file_format} {p.quantization:<7} {p.description}"
        for p in PROFILES.values()
    )
    quants = "; ".join(f"{fmt}: {', '.join(q)}" for fmt, q in QUANTIZATIONS.items())
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "export",
        help="merge a run's adapter into its base, quantize, check quality, write RUN_DIR/export",
        description=(
            "Merge RUN_DIR/adapter into the base model in fp32, write the requested artefact, "
            "measure it against the merged model on the coordinator's held-out text "
            "(perplexity, logit KL, top-1 agreement) and release it only within its quality "
            "gate. RUN_DIR/export is replaced only when everything passed; otherwise the "
            "command fails with the measured numbers and leaves it as it was."
        ),
        epilog=EXPORT_EPILOG.format(profiles=table),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished fedlora run")
    parser.add_argument(
        "--format",
        choices=[*QUANTIZATIONS, "executorch"],
        help="artefact container (default: the run's configured export formats)",
    )
    parser.add_argument("--quant", metavar="Q", help=f"quantization ({quants})")
    parser.add_argument("--profile", metavar="DEVICE", help=f"device class: {', '.join(PROFILES)}")
    parser.add_argument(
        "--model", metavar="PATH", help="base checkpoint (default: the run's model.path)"
    )
    parser.add_argument("--verbose", action="store_true", help="tracebacks on errors")
    return parser


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``fedlora export``; user errors propagate as :class:`fedlora.errors.FedloraError`."""
    formats = resolve_cli_formats(args)
    manifest = export_run_dir(args.run_dir, formats, model=args.model)
    for artefact in manifest["artefacts"]:
        q = artefact["quality"]
        types = artefact.get("details", {}).get("tensor_types")
        print(
            f"{artefact['name']}: {artefact['total_bytes'] / 1e6:.2f} MB, KL {q['kl']:.2e}, "
            f"top-1 {q['top1_agreement']:.4f}, ppl {q['perplexity']:.3f}"
            + (f", tensors {types}" if types else "")
        )
        note = artefact.get("details", {}).get("note")
        if note:
            print(f"  note: {note}")
    print(f"manifest: {Path(args.run_dir) / 'export' / 'manifest.json'}")
    return 0
