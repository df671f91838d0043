"""``fedlora export RUN_DIR``: export a finished run's adapter for a device class."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError
from fedlora.export.profiles import PROFILES, QUANTIZATIONS, format_name, profile_formats
from fedlora.export.rerun import export_run_dir

EXPORT_EPILOG = """\
profiles (device class → format, quantization):
{profiles}

examples:
  fedlora export runs/demo                          # the formats the run was configured with
  fedlora export runs/demo --profile phone-low      # GGUF Q4_K_M for llama.cpp
  fedlora export runs/demo --format gguf --quant q8_0
  fedlora export runs/demo --format safetensors --quant int8 --model ./my-llama
"""


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
