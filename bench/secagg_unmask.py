"""What does SecAgg+'s unmasking cost the coordinator? Flower's Shamir rebuild against fedlora's.

At unmasking the coordinator rebuilds one 32-byte self-mask seed per device in the sum
from the Shamir shares its neighbours return, on its one ServerApp thread, while every
device waits. Flower's ``combine_shares`` passes all k shares a device's neighbours
return to PyCryptodome; :func:`fedlora.secagg.shamir.combine_shares` uses t of them with
Lagrange coefficients cached per index set. Both rebuild the same secrets (checked here
on every one). The share graph (k, t) is the one fedlora picks per round
(:func:`fedlora.server.secagg_graph.share_graph`, δ = 0.1) or the full graph (up to 100 devices).

CPU seconds (process time) per round; Flower's rebuild is timed on ``--flower-sample``
secrets and scaled to the round (it is the same work per secret), fedlora's on all.

    .venv/bin/python bench/secagg_unmask.py [--quick] [--sizes 20 100 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from flwr.common.secure_aggregation.crypto.shamir import (  # noqa: E402
    combine_shares as flower_combine,
)
from flwr.common.secure_aggregation.crypto.shamir import create_shares  # noqa: E402

from bench import benchkit  # noqa: E402
from fedlora.secagg import shamir  # noqa: E402
from fedlora.server.secagg_graph import share_graph  # noqa: E402

SEED_BYTES = 32


def measure(devices: int, full_graph: bool, flower_sample: int) -> dict[str, Any]:
    k, t = share_graph(devices, 1.0 if full_graph else None, None)
    secrets = [os.urandom(SEED_BYTES) for _ in range(devices)]
    shares = [create_shares(s, t, k) for s in secrets]

    shamir.lagrange_at_zero.cache_clear()  # a round's first index set is paid for
    started = time.process_time()
    ours = [shamir.combine_shares(p, t) for p in shares]
    ours_s = time.process_time() - started
    if ours != secrets:
        raise SystemExit("fedlora's rebuild differs from the secrets shared")

    sample = min(flower_sample, devices)
    started = time.process_time()
    theirs = [flower_combine(p) for p in shares[:sample]]
    flower_s = (time.process_time() - started) / sample * devices
    if theirs != secrets[:sample]:
        raise SystemExit("Flower's rebuild differs from the secrets shared")
    return {
        "devices": devices,
        "graph": "full" if full_graph else "sparse",
        "shares_k": k,
        "threshold_t": t,
        "flower_cpu_s": round(flower_s, 3),
        "fedlora_cpu_s": round(ours_s, 4),
        "ratio": round(ours_s / flower_s, 4),
        "flower_secrets_timed": sample,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes 20 and 100")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 100, 1000])
    parser.add_argument("--flower-sample", type=int, default=40)
    args = parser.parse_args()
    sizes = [20, 100] if args.quick else args.sizes
    started = time.perf_counter()
    # The full graph only up to 100 devices: beyond, creating the shares alone (the
    # devices' work, PyCryptodome) takes longer than this bench should.
    rows = [
        measure(n, full, args.flower_sample)
        for n in sizes
        for full in ((False, True) if n <= 100 else (False,))
    ]
    headline = next((r for r in rows if r["devices"] == 100 and r["graph"] == "sparse"), rows[0])
    benchkit.emit(
        {
            "bench": "secagg_unmask",
            "figure": headline["ratio"],
            "unit": "ratio (CPU s to rebuild a round's self-mask seeds, fedlora ÷ Flower, "
            f"{headline['devices']} devices, sparse graph)",
            "comparison": "fedlora.secagg.shamir.combine_shares (t shares, cached Lagrange "
            "coefficients) against Flower 1.39's combine_shares (all k shares, PyCryptodome), "
            "same shares, same secrets",
            "rows": rows,
            "quick": args.quick,
            "machine": benchkit.machine(),
            "wall_s": round(time.perf_counter() - started, 1),
        }
    )


if __name__ == "__main__":
    main()
