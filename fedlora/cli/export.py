"""``fedlora export RUN_DIR``: export a finished run's adapter for a device class."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedlora.argtypes import gate_override
from fedlora.export.profiles import (
    PROFILES,
    QUANTIZATIONS,
    format_name,
    format_of,
    profile_formats,
)
from fedlora.export.rerun import export_run_dir

EXPORT_EPILOG = """\
profiles (device class → format, quantization):
{profiles}

Each call adds its artefacts to RUN_DIR/export and keeps the ones already there (with
their manifest entries), so profiles are released side by side; an artefact already
exported is refused unless --replace.

examples:
  fedlora export runs/demo                          # the formats the run was configured with
  fedlora export runs/demo --profile phone-low      # add GGUF Q4_K_M for llama.cpp
  fedlora export runs/demo --profile phone-low --profile phone-high
  fedlora export runs/demo --quant q8_0 --quant q4_k_m
  fedlora export runs/demo --profile phone-high --replace   # export Q8_0 again
  fedlora export runs/demo --format safetensors --quant int8 --model ./my-llama
  fedlora export runs/demo --quant int8 --gate int8.max_perplexity_increase=0.05
"""


def resolve_cli_formats(args: argparse.Namespace) -> tuple[str, ...] | None:
    """Format names from every ``--profile`` and ``--quant`` (a bare ``--format``: its
    default quantization), without repeats; None when none is given: the run's config."""
    profiles: list[str] = args.profile or []
    quants: list[str] = args.quant or []
    if not (profiles or quants or args.format):
        return None
    names: list[str | None] = [n for p in profiles for n in profile_formats(p)]
    for quant in quants:
        names.append(format_name(args.format or format_of(quant), quant))
    if args.format and not quants:
        names.append(format_name(args.format))
    return tuple(dict.fromkeys(n for n in names if n))


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
            "Merge RUN_DIR/adapter into the base model in fp32 (once: later calls reuse it), "
            "write the requested artefacts, measure each against the merged model on the "
            "coordinator's held-out text (perplexity, logit KL, top-1 agreement) and add them "
            "to RUN_DIR/export only if every one passes its quality gate. A quantized GGUF is "
            "gated against llama.cpp's own quantization of fedlora's F32 conversion, which "
            "must itself match the merged model exactly. Artefacts already exported stay; "
            "on any failure the command prints the numbers and RUN_DIR/export and its "
            "manifest stay exactly as they were."
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
    parser.add_argument(
        "--quant",
        metavar="Q",
        action="append",
        help=f"quantization, repeatable; names its format ({quants})",
    )
    parser.add_argument(
        "--profile",
        metavar="DEVICE",
        action="append",
        help=f"device class, repeatable: {', '.join(PROFILES)}",
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="export again the requested artefacts that RUN_DIR/export already holds",
    )
    parser.add_argument(
        "--model", metavar="PATH", help="base checkpoint (default: the run's model.path)"
    )
    parser.add_argument(
        "--gate",
        metavar="NAME.KEY=VALUE",
        action="append",
        type=gate_override,
        help=(
            "replace one key of an artefact's quality gate for this export, repeatable: "
            "max_kl, min_top1_agreement or max_perplexity_increase (a fraction: 0.05 = +5%%) "
            "of int8, gguf-q4_k_m, merged-fp32, ... (default: the format's gate, with the "
            "run's export.gates on top)"
        ),
    )
    parser.add_argument("--verbose", action="store_true", help="tracebacks on errors")
    return parser


def describe_artefact(artefact: dict[str, Any]) -> list[str]:
    """An artefact's manifest entry as the lines ``fedlora export`` prints."""
    q, gate = artefact["quality"], artefact.get("gate", {})
    types = artefact.get("details", {}).get("tensor_types")
    lines = [
        f"{artefact['name']}: {artefact['total_bytes'] / 1e6:.2f} MB, KL {q['kl']:.2e}, "
        f"top-1 {q['top1_agreement']:.4f}, ppl {q['perplexity']:.3f}"
        + (f", tensors {types}" if types else "")
    ]
    ref = gate.get("reference")
    if isinstance(ref, dict):
        same = " (the same file)" if ref.get("identical_to_artefact") else ""
        lines.append(
            f"  gate: llama.cpp's own {artefact.get('quantization')}{same} KL {ref['kl']:.2e}, "
            f"top-1 {ref['top1_agreement']:.4f} → KL ≤ {gate['max_kl']:.2e}, "
            f"top-1 ≥ {gate['min_top1_agreement']:.4f}"
        )
    conv = gate.get("conversion")
    if isinstance(conv, dict):
        tok = conv.get("tokenization")
        same = f", tokenization identical on {tok['identical']}/{tok['texts']} texts" if tok else ""
        lines.append(
            f"  conversion ({conv['name']}): KL {conv['kl']:.2e}, "
            f"top-1 {conv['top1_agreement']:.4f}{same}"
        )
    note = artefact.get("details", {}).get("note")
    if note:
        lines.append(f"  note: {note}")
    return lines


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``fedlora export``; user errors propagate as :class:`fedlora.errors.FedloraError`."""
    from fedlora.export.formats import MERGED  # loads torch: not at --help time

    formats = resolve_cli_formats(args)
    gates: dict[str, dict[str, float]] = {}
    for name, key, value in args.gate or []:
        gates.setdefault(name, {})[key] = value
    manifest = export_run_dir(
        args.run_dir, formats, model=args.model, replace=args.replace, gates=gates
    )
    shown = {MERGED, *formats} if formats is not None else None
    kept = []
    for artefact in manifest["artefacts"]:
        if shown is not None and artefact["name"] not in shown:
            kept.append(artefact["name"])
            continue
        print("\n".join(describe_artefact(artefact)))
    if kept:
        print(f"kept: {', '.join(kept)}")
    print(f"manifest: {Path(args.run_dir) / 'export' / 'manifest.json'}")
    return 0
