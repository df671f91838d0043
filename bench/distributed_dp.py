"""Device-level DP: the distributed discrete Gaussian at b bits against a trusted coordinator.

At one device-level budget (ε = 8, δ = 1e-5 by default) on the embedded fleet (100
devices, 10 sampled per round), every variant trains the same schedule from the same
base with the same sampling seed:

* ``nondp``: no noise, no clipping (what the others lose utility against);
* ``central_gaussian``: the trusted-coordinator baseline. Each device's update is
  clipped to ``privacy.device.clip_norm``; the coordinator sums them and adds continuous
  Gaussian noise of std z·C, z the noise multiplier at which ``participations`` rounds of
  the Gaussian mechanism meet ε under the same RDP accountant (the τ = 0 limit of the
  device-level accountant). It needs the coordinator to see every update;
* ``ddg_b16``, ``ddg_b20``, ``ddg_b32``: fedlora's device-level DP at that modulus: the
  product's own device code (``DeviceClient.fit``), encoding (``fedlora.ddp.encoding``:
  clip, rotate, grid, round, each device's discrete Gaussian share from its OS CSPRNG),
  the sum mod 2^b that SecAgg+ unmasks (masks cancel exactly, so they are left out
  here), and the coordinator's decode, ledger and aggregation
  (``LoraFedAvg.aggregate_fit``). Flower's transport is not in the loop; the
  ``fedlora simulate`` e2e test runs the same code through it.

Reported per variant: held-out loss by round, the noise std the mean update carries in
float units per coordinate (from the plan: √n·σ·C/s ÷ n), the ε the coordinator's ledger
holds, and the uplink bytes per adapter value (the packed masked vector, count slot
included). Figure: uplink bytes per value at b = 16 (target ≤ 2).

    .venv/bin/python bench/distributed_dp.py [--quick] [--rounds N] [--seed S]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import benchkit as bk

TARGET_BYTES = 2.0
BITS = (16, 20, 32)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/distributed_dp.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds (about a minute on 2 idle cores)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 10; quick 2)")
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=None, help="privacy.device.clip_norm")
    p.add_argument("--adapter", choices=("lora", "ffa"), default="lora")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 10
    return args


def config(args: argparse.Namespace, bits: int | None) -> Any:
    """The run's config: device-level DP at ``bits`` (None: no DP, no SecAgg+)."""
    from fedlora.config import FedloraConfig

    device: dict[str, Any] = {"epsilon": args.epsilon, "delta": args.delta}
    if args.clip is not None:
        device["clip_norm"] = args.clip
    if bits is not None:
        device["bits"] = bits
    return FedloraConfig().replace(
        seed=args.seed,
        lora={"variant": args.adapter},
        fleet={
            "num_devices": args.devices,
            "devices_per_round": args.per_round,
            "min_devices": min(3, args.per_round),
        },
        training={"rounds": args.rounds},
        privacy={"enabled": bits is not None, "unit": "device", "device": device},
        secagg={"enabled": bits is not None},
        export={"enabled": False},
    )


def _progress(variant: str, rnd: int, loss: float, started: float) -> None:
    print(
        f"{variant}: round {rnd} held-out loss {loss:.4f} ({time.perf_counter() - started:.0f} s)",
        file=sys.stderr,
        flush=True,
    )


def run(args: argparse.Namespace, variant: str, work: Path) -> dict[str, Any]:
    import numpy as np
    from flwr.app import Context, RecordDict
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from fedlora import runtime
    from fedlora.client.device_client import DeviceClient
    from fedlora.config import resolve_device_level
    from fedlora.ddp.encoding import encode
    from fedlora.privacy import ddg_noise_multiplier
    from fedlora.privacy.noise import SecureRandom
    from fedlora.protocol import NUM_ROUNDS_KEY, ROUND_KEY
    from fedlora.secagg import packing
    from fedlora.server.aggregate import apply_update
    from fedlora.server.app import make_evaluator
    from fedlora.server.budget import FleetBudget
    from fedlora.server.strategy import LoraFedAvg

    bits = int(variant.removeprefix("ddg_b")) if variant.startswith("ddg_") else None
    cfg = config(args, bits)
    bundle = runtime.model_bundle(cfg)
    budget = FleetBudget(cfg.privacy)
    clients = {}
    for i in range(cfg.fleet.num_devices):
        ctx = Context(
            run_id=1, node_id=i + 1, node_config={"partition-id": i}, state=RecordDict(),
            run_config={},
        )  # fmt: skip
        clients[i + 1] = DeviceClient(cfg, ctx, device_root=work / variant / "devices")
        budget.register(i + 1, clients[i + 1].get_properties({}))
    strategy = LoraFedAvg(
        cfg, [a.copy() for a in bundle.initial_arrays], bundle.names, make_evaluator(cfg),
        budget, work / variant, run_id="1",
    )  # fmt: skip
    strategy.evaluate(0, ndarrays_to_parameters(strategy.global_arrays))
    ddp = strategy.device_level
    dp_cfg = cfg.privacy.device
    participations, _ = resolve_device_level(cfg)
    z = ddg_noise_multiplier(dp_cfg.epsilon, dp_cfg.delta, participations)
    rng = np.random.default_rng(args.seed)
    noise = SecureRandom()
    started = time.perf_counter()
    for rnd in range(1, args.rounds + 1):
        pool = budget.eligible(sorted(clients)) if ddp is not None else sorted(clients)
        k = min(args.per_round, len(pool))
        nodes = sorted(pool[int(i)] for i in rng.choice(len(pool), k, replace=False))
        # What configure_fit does when Flower drives the round: a fresh round state.
        strategy._round = type(strategy._round)(started=time.perf_counter())
        fit_config: dict[str, Any] = {ROUND_KEY: rnd, NUM_ROUNDS_KEY: args.rounds}
        if ddp is not None:
            fit_config.update(ddp.fit_config(rnd))
        updates, results = [], []
        for node in nodes:
            update, n, metrics = clients[node].fit([a.copy() for a in strategy.global_arrays],
                                                    fit_config)  # fmt: skip
            updates.append(update)
            results.append((SimpleNamespace(node_id=node), FitRes(Status(Code.OK, ""), None, n,
                                                                  metrics)))  # fmt: skip
        flat = [np.concatenate([u.reshape(-1).astype(np.float64) for u in up]) for up in updates]
        if ddp is not None:
            mod = ddp.params.modulus
            total = np.zeros(ddp.params.padded_dimension, dtype=np.uint64)
            for x in flat:
                total = (total + encode(x, ddp.params, ddp.rotation_seed(rnd), noise)) % mod
            strategy.charge_device_level(rnd, nodes)  # what the workflow does on unmasking
            mean = ddp.decode(rnd, [np.array([len(flat)], dtype=np.uint64), total], len(flat))
            for _, res in results:
                res.parameters = ndarrays_to_parameters(mean)
            new, _ = strategy.aggregate_fit(rnd, results, [])  # type: ignore[arg-type]
            strategy.evaluate(rnd, new or ndarrays_to_parameters(strategy.global_arrays))
            _progress(variant, rnd, strategy.rows[-1]["eval_loss"], started)
            continue
        if variant == "central_gaussian":
            clipped = []
            for x in flat:
                norm = float(np.linalg.norm(x))
                clipped.append(x * min(1.0, dp_cfg.clip_norm / norm) if norm > 0 else x)
            summed = np.sum(clipped, axis=0)
            summed = summed + noise.gaussian(summed.size, z * dp_cfg.clip_norm)
            mean_flat = summed / len(flat)
        else:
            mean_flat = np.mean(flat, axis=0)
        mean, at = [], 0
        for g in strategy.global_arrays:
            mean.append(mean_flat[at : at + g.size].reshape(g.shape))
            at += g.size
        strategy.global_arrays = apply_update(strategy.global_arrays, mean)
        strategy.evaluate(rnd, ndarrays_to_parameters(strategy.global_arrays))
        _progress(variant, rnd, strategy.rows[-1]["eval_loss"], started)
    d = int(sum(a.size for a in bundle.initial_arrays))
    n = args.per_round
    out: dict[str, Any] = {
        "eval_loss_by_round": [round(r["eval_loss"], 4) for r in strategy.rows],
        "wall_s": round(time.perf_counter() - started, 1),
        "adapter_values": d,
    }
    if ddp is not None:
        p = ddp.params
        itemsize = packing.wire_dtype(p.modulus).itemsize
        out.update(
            scale=p.scale,
            noise_stddev_per_device=p.noise_stddev,
            l2_sensitivity=p.l2_sensitivity,
            padded_dimension=p.padded_dimension,
            # per coordinate of the mean update of n devices, in float units
            mean_noise_std=p.noise_stddev * math.sqrt(n) * p.clip / p.scale / n,
            uplink_bytes_per_value=round((p.padded_dimension + 1) * itemsize / d, 4),
            max_device_epsilon=round(budget.worst_device_epsilon(), 4),
            survivors_by_round=[r.get("survivors") for r in strategy.rows[1:]],
        )
    elif variant == "central_gaussian":
        out.update(
            noise_multiplier=z,
            mean_noise_std=z * dp_cfg.clip_norm / n,
            uplink_bytes_per_value=4.0,
        )
    runtime.clear()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bk.setup_env()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="fedlora-bench-ddp-"))
    variants = ["nondp", "central_gaussian", *(f"ddg_b{b}" for b in BITS)]
    with bk.stdout_to_stderr():
        runs = {v: run(args, v, work) for v in variants}
    central = runs["central_gaussian"]
    rows = {
        v: {
            "final_loss": r["eval_loss_by_round"][-1],
            "minus_central_gaussian": round(
                r["eval_loss_by_round"][-1] - central["eval_loss_by_round"][-1], 4
            ),
            "noise_std_vs_central": round(r["mean_noise_std"] / central["mean_noise_std"], 4)
            if "mean_noise_std" in r
            else None,
        }
        for v, r in runs.items()
    }
    figure = runs["ddg_b16"]["uplink_bytes_per_value"]
    cfg0 = config(args, 16)
    bk.emit(
        {
            "bench": "distributed_dp",
            "figure": figure,
            "unit": "uplink bytes per adapter value at b = 16 (packed masked vector)",
            "comparison": (
                f"device-level DP at ε = {args.epsilon:g}, δ = {args.delta:g}: the distributed "
                f"discrete Gaussian at b = 16/20/32 against a trusted coordinator's Gaussian "
                f"noise, {args.devices} devices, {args.per_round} per round, {args.rounds} "
                "rounds (held-out loss in `summary`); fp32 plain updates send 4 bytes a value"
            ),
            "target": TARGET_BYTES,
            "meets_target": figure <= TARGET_BYTES,
            "summary": rows,
            "runs": runs,
            "schedule": {
                "rounds": args.rounds,
                "devices": args.devices,
                "devices_per_round": args.per_round,
                "adapter": args.adapter,
                "clip_norm": cfg0.privacy.device.clip_norm,
                "local_steps": cfg0.training.local_steps,
                "learning_rate": cfg0.learning_rate,
                "seed": args.seed,
            },
            "wall_s": round(time.perf_counter() - started, 1),
            "machine": bk.machine(),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
