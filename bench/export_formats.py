"""Every export format side by side on one run's held-out text: size, quality, speed.

Merges ``RUN_DIR/adapter`` into the run's base once (fp32), then writes each
registered format from it (int8 safetensors and GGUF F32 / F16 / Q8_0 / Q4_K_M
by default), loads it in its runtime (PyTorch for int8, llama.cpp for GGUF) and
measures it against the merged model on the coordinator's held-out text, the
same tokens ``fedlora export`` gates on. Unlike ``fedlora export`` nothing is
gated away: a format outside its gate is listed with ``"gate": "fail"``.

Prints one JSON object to stdout: the held-out token count and per format the
artefact bytes, bytes relative to fp32, KL, top-1 agreement, perplexity (and the
merged model's), its default gate and pass/fail, the GGUF tensor types, and the
wall time of scoring the held-out set. Library chatter goes to stderr.

    .venv/bin/python bench/export_formats.py RUN_DIR [--formats int8 gguf-q8_0 ...]

The embedded default model (hidden 128, FFN 344) has no rows llama.cpp can store
as K-quant blocks (multiples of 256), so its "Q4_K_M" is a per-tensor fallback.
``--kquant-base`` builds (once, in the model cache) a base with the same recipe
but hidden 256 / FFN 768, whose Q4_K_M is made of real Q4_K / Q6_K tensors, and
prints its path; train a run on it as a user's ``--model`` and bench that run:

    base=$(.venv/bin/python bench/export_formats.py --kquant-base)
    .venv/bin/fedlora simulate --out runs/kquant --model "$base" --no-export
    .venv/bin/python bench/export_formats.py runs/kquant --formats int8 gguf-q8_0 gguf-q4_k_m
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedlora.export import available_formats, get_format
from fedlora.export.merge import load_fp32_model, merge_adapter
from fedlora.export.quality import compare_logits
from fedlora.export.rerun import run_inputs
from fedlora.model import BaseModelSpec, default_model_path

KQUANT_SPEC = BaseModelSpec(
    name="fedlora-kquant-llama", hidden_size=256, intermediate_size=768, pretrain_steps=80
)
"""The default base's recipe with K-quant-capable widths (every matrix row a multiple of 256)."""


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench(run_dir: Path, formats: list[str], model: str | None = None) -> dict[str, Any]:
    _, base, adapter, ids, mask = run_inputs(run_dir, model)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedlora-bench-") as tmp:
        merged_dir = merge_adapter(base, adapter, Path(tmp) / "merged")
        merged = load_fp32_model(merged_dir)
        fp32_bytes = sum(p.stat().st_size for p in merged_dir.glob("*.safetensors"))
        results["merged-fp32"] = {"bytes": fp32_bytes, "relative_size": 1.0}
        for name in formats:
            fmt = get_format(name)
            out = fmt.write(merged_dir, Path(tmp) / name)
            candidate = fmt.load(out)
            start = time.perf_counter()
            quality = compare_logits(merged, candidate, ids, mask)
            wall = time.perf_counter() - start
            del candidate
            size = _bytes(out) if fmt.file_format != "safetensors" else _weights_bytes(out)
            entry: dict[str, Any] = {
                "format": fmt.file_format,
                "quantization": fmt.quantization,
                "bytes": size,
                "relative_size": round(size / fp32_bytes, 4),
                **{k: quality[k] for k in ("kl", "top1_agreement", "perplexity")},
                "reference_perplexity": quality["reference_perplexity"],
                "gate": "pass" if not fmt.default_gate.failures(quality) else "fail",
                "default_gate": fmt.default_gate.as_dict(),
                "score_wall_s": round(wall, 2),
            }
            if fmt.describe is not None:
                details = fmt.describe(out)
                entry["tensor_types"] = details["tensor_types"]
                if "note" in details:
                    entry["note"] = details["note"]
            results[name] = entry
    smallest = min(
        (k for k, v in results.items() if v.get("gate") == "pass"),
        key=lambda k: results[k]["bytes"],
        default=None,
    )
    return {
        "bench": "export_formats",
        "figure": results[smallest]["relative_size"] if smallest else None,
        "unit": "ratio (bytes of the smallest artefact that passes its gate ÷ merged fp32 bytes)",
        "comparison": (
            "every export format written from the same merged fp32 model and scored on the "
            "run's held-out text (KL, top-1 agreement, perplexity vs the merged model)"
            + (f"; smallest passing: {smallest}" if smallest else "; none passes its gate")
        ),
        "run_dir": str(run_dir),
        "heldout_tokens": int(mask.sum()),
        "formats": results,
    }


def _weights_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", nargs="?")
    p.add_argument("--formats", nargs="+", default=list(available_formats()))
    p.add_argument("--model", help="base checkpoint (default: the run's model.path)")
    p.add_argument(
        "--kquant-base",
        action="store_true",
        help="build (once) the K-quant-capable base (hidden 256, FFN 768), print its path, exit",
    )
    args = p.parse_args(argv)
    if args.kquant_base:
        with contextlib.redirect_stdout(sys.stderr):
            path = default_model_path(spec=KQUANT_SPEC)
        print(path)
        return 0
    if args.run_dir is None:
        p.error("RUN_DIR is required (unless --kquant-base)")
    with contextlib.redirect_stdout(sys.stderr):  # llama.cpp and transformers chatter
        report = bench(args.run_dir, args.formats, args.model)
    json.dump(report, sys.stdout, indent=2, ensure_ascii=False)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
