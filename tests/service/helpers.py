"""Building blocks of the service tests: a coordinator data dir with keys, exports and ledgers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedlora.config import FedloraConfig
from fedlora.export.manifest import MANIFEST_FORMAT, MANIFEST_VERSION, file_entries, write_manifest
from fedlora.privacy import DPSGDEvent, PrivacyLedger
from fedlora.privacy.events import DDGEvent

GATE = {"max_kl": 0.05, "min_top1_agreement": 0.9}


def write_export(run_dir: Path, seed: int = 0) -> dict:
    """A finished export with real files and a real manifest: merged and int8 pass their
    gates, q4 does not (so it must not be released)."""
    export = run_dir / "export"
    rng = __import__("random").Random(seed)
    sizes = {
        "merged/model.safetensors": 1_300_000,
        "merged/config.json": 0,
        "int8/model.bin": 700_001,
    }
    for rel, size in sizes.items():
        path = export / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(size) if size else json.dumps({"vocab_size": 97}).encode()
        path.write_bytes(data)
    (export / "q4").mkdir()
    (export / "q4" / "model.gguf").write_bytes(rng.randbytes(1000))

    def artefact(name: str, fmt: str, quant: str, quality: dict) -> dict:
        files = file_entries(export, name)
        return {
            "name": name,
            "format": fmt,
            "quantization": quant,
            "path": name,
            "files": files,
            "total_bytes": sum(f["bytes"] for f in files),
            "quality": quality,
            "gate": GATE,
        }

    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "artefacts": [
            artefact(
                "merged",
                "safetensors",
                "none",
                {
                    "kl": 1e-9,
                    "top1_agreement": 1.0,
                    "perplexity": 41.5,
                    "reference": "base+adapter",
                },
            ),
            artefact(
                "int8",
                "pytorch-int8",
                "int8",
                {"kl": 0.004, "top1_agreement": 0.97, "reference": "merged"},
            ),
            artefact(
                "q4", "gguf", "q4_0", {"kl": 0.3, "top1_agreement": 0.7, "reference": "merged"}
            ),
        ],
    }
    write_manifest(export, manifest)
    return manifest


def write_run(
    run_dir: Path, events: list[DPSGDEvent], *, epsilon: float, accountant: str = "rdp"
) -> None:
    """``config.json`` and ``privacy/ledger.json`` as a run writes them."""
    cfg = FedloraConfig().replace(
        privacy={"epsilon": epsilon, "delta": 1e-5, "accountant": accountant},
        secagg={"enabled": False},
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    (run_dir / "privacy").mkdir(exist_ok=True)
    PrivacyLedger(events).save(run_dir / "privacy" / "ledger.json")


def event(
    device: str, rnd: int, sigma: float = 1.1, q: float = 0.05, steps: int = 10
) -> DPSGDEvent:
    return DPSGDEvent(
        device=device, round=rnd, noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5
    )


def touch_later(path: Path, seconds: float) -> None:
    """Push a file's mtime forward, so 'the latest run' does not depend on write speed."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(seconds * 1e9)))


def write_device_level_run(
    run_dir: Path, events: list[DPSGDEvent | DDGEvent], *, unit: str, device_epsilon: float
) -> None:
    """A run with device-level DP (``privacy.unit`` ``unit``): config and ledger."""
    cfg = FedloraConfig().replace(
        privacy={"unit": unit, "device": {"epsilon": device_epsilon, "delta": 1e-6}},
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    (run_dir / "privacy").mkdir(exist_ok=True)
    PrivacyLedger(events).save(run_dir / "privacy" / "ledger.json")


def ddg_event(device: str, rnd: int, survivors: int = 9, run: str = "") -> DDGEvent:
    return DDGEvent(
        device=device,
        round=rnd,
        noise_stddev=1200.0,
        survivors=survivors,
        l2_sensitivity=3100.0,
        dimension=40_960,
        delta=1e-6,
        run=run,
    )
