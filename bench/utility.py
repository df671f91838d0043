"""Utility under privacy: how much of the centralized gain does federated DP LoRA keep?

Base: the embedded default model (a tiny LLaMA pretrained on synthetic notes; it never
saw Shakespeare), so there is something to learn. Private data: tinyshakespeare
(``../shared/data/tinyshakespeare.txt``), one speech = one record, the ``--devices``
roles with the most speeches, one role = one device (natural partition). Held-out:
the coordinator's server slice of every role (``data.server_fraction`` of its
speeches), never trained on. Loss is nats per token; perplexity is exp(loss).

For each adapter variant (``lora``: A and B trained; ``ffa``: FFA-LoRA, A frozen from
the seed, B trained and sent) and each seed, from the same base and schedule:

* ``central``: non-DP LoRA on every role's training records pooled; per "round"
  ``local_steps`` steps of expected batch ``batch_size × per_round`` (the examples one
  federated round uses), the same learning rate;
* ``central_dp_eps8``: the same with DP-SGD at ε = 8 (δ = 1e-5) on the pooled records;
* ``fed_nondp`` and ``fed_dp_eps{2,4,8}``: federated rounds, DP-SGD at that ε per device,
  σ calibrated by each device for the whole schedule.

The federated rounds run in this process through the product's own device and
coordinator code: ``DeviceClient.fit`` (budget check, σ calibration, DP-SGD, ledger,
update clipping) and ``LoraFedAvg.aggregate_fit`` / ``evaluate`` (claims and update
validation, the weighted mean, FFA's per-column weights); what is left out is Flower's
transport and SecAgg+'s masking, whose sum is the same weighted mean up to its
quantization (``fedlora simulate`` runs exercise those; ``uplink`` bytes are the update
tensors as serialized). Devices are sampled per round with the seed.

``--server-optimizer`` runs each federated variant once per server optimizer
(``training.server_optimizer``; ``NAME:LR`` sets its ``server_learning_rate``): FedAvg's
runs keep the variant's name, the others are ``VARIANT@SPEC`` (``fed_dp_eps8@fedavgm``).

Figure: (base − fed_dp_eps8) ÷ (base − central) for ``--headline-variant`` (ffa), mean
over seeds, with FedAvg. Without the play it prints ``{"skipped": ...}`` and exits 0.

    .venv/bin/python bench/utility.py [--quick] [--seeds 0 1 2] [--adapters lora ffa]
        [--variants ...] [--learning-rate LR] [--server-optimizer fedavg fedavgm fedadam:0.1]
        [--reproducible-noise]
        [--plot docs/img/utility_shakespeare.png]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import benchkit as bk

PLAY = bk.REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
TARGETS = {"central_gain_nats": 0.5, "eps8": 0.70, "eps2": 0.40}
HEADLINE = "fed_dp_eps8"
RECIPE_LR = 0.5
FED = {"fed_nondp": None, "fed_dp_eps8": 8.0, "fed_dp_eps4": 4.0, "fed_dp_eps2": 2.0}
CENTRAL = {"central": None, "central_dp_eps8": 8.0}
VARIANTS = (*CENTRAL, *FED)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/utility.py", description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="6 roles, 3/round, 3 rounds, 1 seed, central + ε=8"
    )
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    p.add_argument("--adapters", nargs="+", choices=("lora", "ffa"), default=["lora", "ffa"])
    p.add_argument("--headline-variant", choices=("lora", "ffa"), default="ffa")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--devices", type=int, default=None, help="private roles (devices)")
    p.add_argument("--per-round", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--local-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument(
        "--learning-rate",
        type=float,
        default=RECIPE_LR,
        help=f"local learning rate (default {RECIPE_LR}, the best of 0.2/0.5/1.0 measured "
        "at ε = 8 for both adapters; training.learning_rate's default: LoRA 0.2, FFA 0.5)",
    )
    p.add_argument("--max-grad-norm", type=float, default=None)
    p.add_argument(
        "--reproducible-noise",
        action="store_true",
        help="seed each device's DP noise from (seed, device, round) "
        "(privacy.reproducible_noise), so settings compare on the same draws per seed; "
        "default: noise from the OS, different every run",
    )
    p.add_argument(
        "--server-optimizer",
        nargs="+",
        type=server_optimizer_spec,
        default=["fedavg"],
        help="server optimizers to run each federated variant with: fedavg, fedavgm, fedadam, "
        "each optionally NAME:LR for its server learning rate (fedavg is always run)",
    )
    p.add_argument("--plot", type=Path, default=None, help="PNG of the curves by round")
    p.add_argument("--out", type=Path, default=None, help="where the roles' JSONL goes")
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        help="report the runs of these earlier outputs (same schedule) together, run nothing",
    )
    args = p.parse_args(argv)
    sizes: dict[str, Any] = (
        {"seeds": [0], "devices": 6, "per_round": 3, "rounds": 3, "variants": ["central", HEADLINE]}
        if args.quick
        else {"seeds": [0, 1, 2], "devices": 8, "per_round": 4, "rounds": 4, "variants": VARIANTS}
    )
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, (list, tuple)) else value)
    if HEADLINE not in args.variants:
        args.variants.append(HEADLINE)
    if "central" not in args.variants:
        args.variants.insert(0, "central")
    if "fedavg" not in args.server_optimizer:  # the figure is FedAvg's
        args.server_optimizer.insert(0, "fedavg")
    return args


def server_optimizer_spec(text: str) -> str:
    """``NAME`` or ``NAME:LR``, checked as the config would check it."""
    from fedlora.config import TrainingSection
    from fedlora.errors import ConfigError

    try:
        TrainingSection(**server_optimizer_settings(text))
    except (ConfigError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return text


def server_optimizer_settings(spec: str) -> dict[str, Any]:
    """The ``training`` keys of a ``--server-optimizer`` spec."""
    name, _, lr = spec.partition(":")
    out: dict[str, Any] = {"server_optimizer": name}
    if lr:
        out["server_learning_rate"] = float(lr)
    return out


def noise_source(args: argparse.Namespace) -> str:
    """Where the federated runs' DP noise came from, for the JSON."""
    if getattr(args, "reproducible_noise", False):
        return "seeded from (seed, device, round): privacy.reproducible_noise"
    return "OS CSPRNG: not repeatable run to run"


def variant_key(name: str, spec: str) -> str:
    """A run's key: the variant's name with FedAvg, ``VARIANT@SPEC`` otherwise."""
    return name if spec == "fedavg" else f"{name}@{spec}"


# ------------------------------------------------------------------ data


def private_roles(path: Path, devices: int) -> tuple[list[Any], list[str]]:
    """The speeches of the ``devices`` roles with the most speeches, and those roles."""
    from fedlora.data.shakespeare import shakespeare_records

    records = shakespeare_records(path)
    counts: dict[str, int] = {}
    for r in records:
        counts[r.device] = counts.get(r.device, 0) + 1
    roles = sorted(counts, key=lambda d: (-counts[d], d))[:devices]
    keep = set(roles)
    return [r for r in records if r.device in keep], sorted(roles)


def write_jsonl(records: list[Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"device": r.device, "text": r.text}) + "\n")
    return path


def config(
    args: argparse.Namespace,
    data: Path,
    adapter: str,
    seed: int,
    eps: float | None,
    server_optimizer: str = "fedavg",
):
    from fedlora.config import FedloraConfig

    training: dict[str, Any] = {
        "rounds": args.rounds,
        **server_optimizer_settings(server_optimizer),
    }
    for key in ("local_steps", "batch_size", "learning_rate"):  # None: the config default
        if getattr(args, key) is not None:
            training[key] = getattr(args, key)
    privacy: dict[str, Any] = {
        "enabled": eps is not None,
        "reproducible_noise": bool(getattr(args, "reproducible_noise", False)),
    }
    if eps is not None:
        privacy["epsilon"] = eps
    if args.max_grad_norm is not None:
        privacy["max_grad_norm"] = args.max_grad_norm
    return FedloraConfig().replace(
        seed=seed,
        lora={"variant": adapter},
        data={"path": str(data), "partition": "natural"},
        fleet={
            "num_devices": args.devices,
            "devices_per_round": args.per_round,
            "min_devices": min(3, args.per_round),
        },
        training=training,
        privacy=privacy,
        secagg={"enabled": False},
        export={"enabled": False},
    )


# ------------------------------------------------------------------ runs


def federated(cfg: Any, work: Path) -> dict[str, Any]:
    """``cfg.training.rounds`` rounds through DeviceClient and LoraFedAvg, in process."""
    import numpy as np
    from flwr.app import Context, RecordDict
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from fedlora import runtime
    from fedlora.client.device_client import DeviceClient
    from fedlora.protocol import NUM_ROUNDS_KEY, ROUND_KEY
    from fedlora.server.app import make_evaluator
    from fedlora.server.budget import FleetBudget
    from fedlora.server.strategy import LoraFedAvg

    bundle = runtime.model_bundle(cfg)
    clients = {}
    budget = FleetBudget(
        cfg.privacy, steps_per_round=cfg.training.local_steps, batch_size=cfg.training.batch_size
    )
    for i in range(cfg.fleet.num_devices):
        ctx = Context(
            run_id=1, node_id=i + 1, node_config={"partition-id": i}, state=RecordDict(),
            run_config={},
        )  # fmt: skip
        clients[i + 1] = DeviceClient(cfg, ctx, device_root=work / "devices")
        budget.register(i + 1, clients[i + 1].get_properties({}))
    strategy = LoraFedAvg(
        cfg, [a.copy() for a in bundle.initial_arrays], bundle.names, make_evaluator(cfg),
        budget, work, run_id="1",
    )  # fmt: skip
    strategy.evaluate(0, ndarrays_to_parameters(strategy.global_arrays))
    rng = np.random.default_rng(cfg.seed)
    uplink: list[int] = []
    started = time.perf_counter()
    for rnd in range(1, cfg.training.rounds + 1):
        nodes = sorted(int(n) + 1 for n in rng.choice(len(clients), cfg.fleet.devices_per_round,
                                                      replace=False))  # fmt: skip
        results = []
        for node in nodes:
            update, n, metrics = clients[node].fit(
                [a.copy() for a in strategy.global_arrays],
                {ROUND_KEY: rnd, NUM_ROUNDS_KEY: cfg.training.rounds},
            )
            params = ndarrays_to_parameters(update)
            uplink.append(sum(len(t) for t in params.tensors))
            res = FitRes(Status(Code.OK, ""), params, n, metrics)
            results.append((SimpleNamespace(node_id=node), res))
        new, _ = strategy.aggregate_fit(rnd, results, [])  # type: ignore[arg-type]
        strategy.evaluate(rnd, new or ndarrays_to_parameters(strategy.global_arrays))
    rows = strategy.rows
    out = {
        "eval_loss_by_round": [r["eval_loss"] for r in rows],
        "devices_aggregated": [r["num_devices"] for r in rows[1:]],
        "rejected": sum(r["rejected"] for r in rows),
        "clipped_updates": sum(r["clipped"] for r in rows),
        "uplink_bytes_per_device": statistics.mean(uplink),
        "adapter_values_sent": int(sum(a.size for a in bundle.initial_arrays)),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if cfg.privacy.enabled:
        out["max_epsilon"] = budget.worst_epsilon()
    runtime.clear()
    return out


def central(cfg: Any, eps: float | None) -> dict[str, Any]:
    """LoRA on every role's training records pooled (DP-SGD at ``eps`` when given)."""
    from fedlora import runtime
    from fedlora.client.train import LocalTrainingPlan, train_lora
    from fedlora.evaluation import mean_token_loss
    from fedlora.privacy import calibrate_noise_multiplier

    fleet = runtime.fleet(cfg)
    bundle = runtime.model_bundle(cfg)
    pooled = tuple(t for d in fleet.devices for t in d.train)
    ids, mask = runtime.encoded(cfg, "central-train", pooled)
    eval_ids, eval_mask = runtime.encoded(cfg, "server-eval", fleet.server_eval)
    t = cfg.training
    batch = t.batch_size * cfg.fleet.devices_per_round
    sigma = None
    if eps is not None:
        q = min(1.0, batch / len(pooled))
        sigma = calibrate_noise_multiplier(eps, cfg.privacy.delta, q, t.local_steps, t.rounds)
    started = time.perf_counter()
    curve = [mean_token_loss(bundle.model, eval_ids, eval_mask)]
    for r in range(1, t.rounds + 1):
        plan = LocalTrainingPlan(
            steps=t.local_steps,
            expected_batch_size=batch,
            learning_rate=cfg.learning_rate,
            max_grad_norm=cfg.privacy.max_grad_norm,
            noise_multiplier=sigma,
            seed=cfg.seed * 1000 + r,
        )
        train_lora(bundle.model, ids, mask, plan)
        curve.append(mean_token_loss(bundle.model, eval_ids, eval_mask))
    runtime.clear()
    out: dict[str, Any] = {
        "eval_loss_by_round": curve,
        "train_records": len(pooled),
        "expected_batch": batch,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if sigma is not None:
        out["noise_multiplier"] = sigma
    return out


# ------------------------------------------------------------------ report


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.mean(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def summarize(runs: dict[str, dict[str, dict[int, dict[str, Any]]]]) -> dict[str, Any]:
    """Per adapter and variant: final loss, perplexity, gain over base and share of the
    centralized non-DP gain, each as mean/min/max over seeds (shares per seed)."""
    out: dict[str, Any] = {}
    for adapter, variants in runs.items():
        central_runs = variants["central"]
        rows: dict[str, Any] = {}
        for name, by_seed in variants.items():
            finals, gains, shares = [], [], []
            for seed, res in by_seed.items():
                base = res["eval_loss_by_round"][0]
                final = res["eval_loss_by_round"][-1]
                central_gain = base - central_runs[seed]["eval_loss_by_round"][-1]
                finals.append(final)
                gains.append(base - final)
                shares.append((base - final) / central_gain if central_gain > 0 else math.nan)
            rows[name] = {
                "seeds": sorted(by_seed),
                "final_loss": _stats(finals),
                "final_perplexity": round(math.exp(statistics.mean(finals)), 2),
                "gain_nats": _stats(gains),
                "recovered_share": _stats(shares),
                "ends_worse_than_base": any(g < 0 for g in gains),
            }
        out[adapter] = rows
    return out


def cfg_rounds(variants: dict[str, Any]) -> int:
    return len(next(iter(next(iter(variants.values())).values()))["eval_loss_by_round"]) - 1


def plot(runs: dict[str, Any], path: Path, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed: no plot"
    adapters = list(runs)
    fig = Figure(figsize=(6.2 * len(adapters), 4.4), dpi=100)
    for k, adapter in enumerate(adapters):
        ax = fig.add_subplot(1, len(adapters), k + 1)
        for name, by_seed in runs[adapter].items():
            curves = [v["eval_loss_by_round"] for v in by_seed.values()]
            mean = [statistics.mean(c[i] for c in curves) for i in range(len(curves[0]))]
            style = "--" if name.startswith("central") else "-"
            ax.plot(range(len(mean)), mean, style, marker="o", markersize=3, label=name)
        ax.set_xticks(range(cfg_rounds(runs[adapter]) + 1))
        ax.set_xlabel("round")
        ax.set_ylabel("held-out loss, private roles (nats/token)")
        ax.set_title(f"{adapter}: {title}", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return None


def run_all(args: argparse.Namespace, data: Path, out: Path) -> dict[str, Any]:
    runs: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for adapter in args.adapters:
        runs[adapter] = {}
        for name in args.variants:
            specs = ["fedavg"] if name in CENTRAL else args.server_optimizer
            for spec in specs:
                key = variant_key(name, spec)
                by_seed = runs[adapter].setdefault(key, {})
                for seed in args.seeds:
                    eps = CENTRAL[name] if name in CENTRAL else FED[name]
                    cfg = config(args, data, adapter, seed, eps, spec)
                    bk.log(f"utility: {adapter} {key} seed {seed}")
                    with bk.stdout_to_stderr():
                        if name in CENTRAL:
                            by_seed[seed] = central(cfg, eps)
                        else:
                            work = Path(tempfile.mkdtemp(prefix=f"{adapter}-{name}-", dir=out))
                            by_seed[seed] = federated(cfg, work)
                    bk.log(f"  → {by_seed[seed]['eval_loss_by_round']}")
    return runs


def merged(paths: list[Path]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The runs of several earlier outputs of this bench, adapter → variant → seed, the first
    of each (adapter, variant, seed) in the order given; later runs of the same one are
    returned apart, as repeats (DP noise from the OS differs from run to run)."""
    runs: dict[str, Any] = {}
    repeats: dict[str, Any] = {}
    for path in paths:
        for adapter, variants in json.loads(path.read_text())["runs"].items():
            for name, by_seed in variants.items():
                for seed, res in by_seed.items():
                    slot = runs.setdefault(adapter, {}).setdefault(name, {})
                    if int(seed) in slot:
                        again = repeats.setdefault(adapter, {}).setdefault(name, {})
                        again.setdefault(int(seed), []).append(res["eval_loss_by_round"])
                    else:
                        slot[int(seed)] = res
    return runs, repeats


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bk.setup_env()
    if not PLAY.is_file():
        bk.emit({"bench": "utility", "skipped": f"{PLAY} not found (tinyshakespeare is optional)"})
        return 0
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    started = time.perf_counter()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedlora-bench-utility-"))
    records, roles = private_roles(PLAY, args.devices)
    data = write_jsonl(records, out / "private_roles.jsonl")
    repeats: dict[str, Any] = {}
    if args.merge:
        runs, repeats = merged(args.merge)
        args.adapters = list(runs)
        args.seeds = sorted({int(s) for v in runs.values() for r in v.values() for s in r})
    else:
        runs = run_all(args, data, out)
    summary = summarize(runs)
    headline = args.headline_variant if args.headline_variant in summary else next(iter(summary))
    head = summary[headline]
    figure = head[HEADLINE]["recovered_share"]["mean"]
    checks = {
        "central_gain_nats": head["central"]["gain_nats"]["mean"],
        "eps8_share": figure,
        "eps2_share": head.get("fed_dp_eps2", {}).get("recovered_share", {}).get("mean"),
        "no_eps_worse_than_base": not any(
            v["ends_worse_than_base"]
            for k, v in head.items()
            if k.startswith("fed_dp") and "@" not in k
        ),
    }
    met = {
        "central_gain": checks["central_gain_nats"] >= TARGETS["central_gain_nats"],
        "eps8": figure >= TARGETS["eps8"],
        "eps2": checks["eps2_share"] is not None and checks["eps2_share"] >= TARGETS["eps2"],
        "no_eps_worse_than_base": checks["no_eps_worse_than_base"],
    }
    uplink = {a: next(iter(runs[a][HEADLINE].values()))["uplink_bytes_per_device"] for a in runs}
    cfg0 = config(args, data, headline, args.seeds[0], None)
    note = None
    if args.plot is not None:
        note = plot(
            runs,
            args.plot,
            f"{args.devices} roles, {args.per_round}/round, {cfg0.training.local_steps} local "
            f"steps, lr {cfg0.learning_rate:g}; mean over seeds {args.seeds}",
        )
    bk.emit(
        {
            "bench": "utility",
            "figure": round(figure, 3),
            "unit": "ratio ((base − federated DP ε=8) ÷ (base − centralized non-DP) held-out loss)",
            "comparison": (
                f"share of the centralized non-DP LoRA gain recovered by federated DP-SGD "
                f"{headline} at ε = 8, δ = 1e-5, after {args.rounds} rounds, on "
                f"held-out speeches of {args.devices} Shakespeare roles (mean of "
                f"{len(args.seeds)} seeds); base: the embedded model, which never saw the play"
            ),
            "target": TARGETS["eps8"],
            "targets": TARGETS,
            "meets_target": bool(met["eps8"]),
            "checks": checks,
            "met": met,
            "summary": summary,
            "uplink_bytes_per_device": uplink,
            "uplink_ffa_over_lora": round(uplink["ffa"] / uplink["lora"], 3)
            if {"ffa", "lora"} <= set(uplink)
            else None,
            "data": {
                "play": str(PLAY),
                "roles": roles,
                "speeches": len(records),
                "server_fraction": cfg0.data.server_fraction,
                "heldout_fraction": cfg0.data.heldout_fraction,
            },
            "schedule": {
                "rounds": args.rounds,
                "devices": args.devices,
                "devices_per_round": args.per_round,
                "local_steps": cfg0.training.local_steps,
                "batch_size": cfg0.training.batch_size,
                "learning_rate": cfg0.learning_rate,
                "max_grad_norm": cfg0.privacy.max_grad_norm,
                "max_update_norm": cfg0.privacy.max_update_norm,
                "dp_noise": noise_source(args),
                "server_optimizers": args.server_optimizer,
                "lora_r": cfg0.lora.r,
                "seeds": args.seeds,
            },
            "runs": runs,
            **({"merged_from": [str(p) for p in args.merge]} if args.merge else {}),
            **({"repeats": repeats} if repeats else {}),
            **({"plot": str(args.plot)} if args.plot and not note else {}),
            **({"plot_note": note} if note else {}),
            "quick": args.quick,
            "machine": bk.machine(),
            "wall_s": round(time.perf_counter() - started, 1),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
