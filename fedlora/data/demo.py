"""``fedlora demo-data``: per-device JSONL files from the embedded corpus, for trials.

A real device already has its records; to try ``fedlora device`` without any,
this writes what a simulated fleet's devices hold (train and held-out records
together: the device splits them itself) as ``OUT/device-<i>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from fedlora.errors import ConfigError


def write_demo_data(args: argparse.Namespace) -> int:
    from fedlora.data.fleet import build_fleet

    if args.devices < 2:
        raise ConfigError(f"--devices must be ≥ 2, got {args.devices}")
    fleet = build_fleet(args.data, num_devices=args.devices, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, device in enumerate(fleet.devices):
        target = out / f"device-{i}.jsonl"
        lines = [
            json.dumps({"device": device.device, "text": t}, ensure_ascii=False)
            for t in (*device.train, *device.heldout)
        ]
        fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        os.replace(tmp, target)
        print(f"{target}: {len(lines)} records of {device.device}")
    return 0
