"""Utility under privacy: how much of the centralized gain does federated DP LoRA keep?

tinyshakespeare (``../shared/data/tinyshakespeare.txt``), one speech = one record:

* **public split**: the speeches of the first ``--public-fraction`` of the file
  (the plays there). A tiny LLaMA like the embedded default (byte-level BPE
  tokenizer, hidden 128, 2 layers) is built from config and pretrained briefly
  on it, non-privately, then saved and cached (``$FEDLORA_CACHE/bench``); the
  federated runs use it through ``model.path``.
* **private split**: the ``--devices`` roles with the most speeches in the rest of
  the file that never speak in the public part; one role = one device (JSONL,
  natural partition). Held-out loss is the coordinator's: every role's server
  slice, never trained on.

Then, from the same base, LoRA adapter, seed and schedule:

* ``base``: no fine-tuning (round 0);
* ``central``: non-DP LoRA on all private roles' training records pooled, in this
  process; per "round" ``local_steps`` SGD steps of expected batch
  ``batch_size × devices_per_round`` (what one federated round aggregates), the
  same learning rate;
* ``fed_nondp``, ``fed_dp_eps8``, ``fed_dp_eps2`` (DP-SGD at that ε per device,
  δ = 1e-5, σ calibrated to the whole schedule), and each ``…_secagg`` with SecAgg+.

Figure: (base − fed_dp_eps8) ÷ (base − central) after the last round, the share of
the centralized non-DP loss reduction the federated DP run recovers. The curves
(held-out loss by round) go to ``--plot`` (PNG, matplotlib's Agg backend).
Without the play it prints ``{"skipped": ...}`` and exits 0.

    .venv/bin/python bench/utility.py [--quick] [--rounds 5] [--variants ...]
                                      [--plot docs/img/utility_shakespeare.png] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import benchkit as bk

PLAY = bk.REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
TARGET = 0.70
HEADLINE = "fed_dp_eps8"
BASE_RECIPE = 1  # bump when the base build below changes (part of its cache key)

VARIANTS: dict[str, dict[str, Any]] = {
    "fed_nondp": {"privacy": {"enabled": False}, "secagg": {"enabled": False}},
    "fed_dp_eps8": {"privacy": {"enabled": True, "epsilon": 8.0}, "secagg": {"enabled": False}},
    "fed_dp_eps2": {"privacy": {"enabled": True, "epsilon": 2.0}, "secagg": {"enabled": False}},
    "fed_nondp_secagg": {"privacy": {"enabled": False}, "secagg": {"enabled": True}},
    "fed_dp_eps8_secagg": {
        "privacy": {"enabled": True, "epsilon": 8.0},
        "secagg": {"enabled": True},
    },
    "fed_dp_eps2_secagg": {
        "privacy": {"enabled": True, "epsilon": 2.0},
        "secagg": {"enabled": True},
    },
}
QUICK_VARIANTS = ("fed_dp_eps8",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/utility.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_VARIANTS)}")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None)
    p.add_argument("--devices", type=int, default=20, help="private roles (devices)")
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--public-fraction", type=float, default=0.5)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", type=Path, default=None, help="PNG of the curves")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--reuse",
        action="store_true",
        help="take a variant's completed run under --out (same config) instead of rerunning it",
    )
    args = p.parse_args(argv)
    if args.variants is None:
        args.variants = list(QUICK_VARIANTS) if args.quick else list(VARIANTS)
    if HEADLINE not in args.variants:
        args.variants.insert(0, HEADLINE)
    return args


# ------------------------------------------------------------------ data


def split_play(path: Path, public_fraction: float, devices: int) -> tuple[list[str], list[Any]]:
    """Public speeches (first part of the file) and the private roles' records."""
    from fedlora.data.shakespeare import shakespeare_records

    records = shakespeare_records(path)
    cut = int(len(records) * public_fraction)
    public, rest = records[:cut], records[cut:]
    public_roles = {r.device for r in public}
    counts: dict[str, int] = {}
    for r in rest:
        if r.device not in public_roles:
            counts[r.device] = counts.get(r.device, 0) + 1
    chosen = sorted(counts, key=lambda d: (-counts[d], d))[:devices]
    if len(chosen) < devices:
        raise SystemExit(f"only {len(chosen)} private roles; ask for fewer --devices")
    keep = set(chosen)
    return [r.text for r in public], [r for r in rest if r.device in keep]


def write_jsonl(records: list[Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"device": r.device, "text": r.text}) + "\n")
    return path


# ------------------------------------------------------------------ base model


def build_base(public: list[str], steps: int, seed: int) -> tuple[Path, dict[str, Any]]:
    """A tiny LLaMA pretrained on the public speeches, cached by recipe and text."""

    from fedlora.model import (
        BaseModelSpec,
        _portable_tokenizer_class,
        mean_token_loss,
        pretrained_llama,
        train_tokenizer,
    )

    spec = BaseModelSpec(name="shakespeare-public", pretrain_steps=steps, seed=seed)
    digest = hashlib.sha256(
        json.dumps({"spec": asdict(spec), "recipe": BASE_RECIPE}).encode()
        + "\0".join(public).encode()
    ).hexdigest()[:12]
    root = Path(os.environ.get("FEDLORA_CACHE", "/tmp/fc")) / "bench"
    final = root / f"{spec.name}-{digest}"
    info_file = final / "bench_base.json"
    if info_file.is_file():
        return final, json.loads(info_file.read_text())
    t0 = time.perf_counter()
    held = public[-500:]
    train = public[:-500]
    tokenizer = train_tokenizer(train, spec.vocab_size, spec.max_positions)
    model, losses = pretrained_llama(tokenizer, train, spec)
    info = {
        "public_speeches": len(train),
        "pretrain_steps": steps,
        "pretrain_first_loss": losses[0] if losses else None,
        "pretrain_last_loss": losses[-1] if losses else None,
        "public_heldout_loss": mean_token_loss(model, tokenizer, held, seq_len=spec.seq_len),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".base-", dir=root))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _portable_tokenizer_class(tmp / "tokenizer_config.json")
    info["build_s"] = round(time.perf_counter() - t0, 1)
    (tmp / "bench_base.json").write_text(json.dumps(info, indent=2))
    tmp.chmod(0o755)
    os.replace(tmp, final)
    return final, info


# ------------------------------------------------------------------ runs


def fed_config(args: argparse.Namespace, data: Path, model: Path, **sections: Any) -> dict:
    base: dict[str, Any] = {
        "seed": args.seed,
        "model": {"path": str(model)},
        "data": {"path": str(data), "partition": "natural"},
        "fleet": {"num_devices": args.devices, "devices_per_round": args.per_round},
        "training": {"rounds": args.rounds, "local_steps": args.local_steps},
        "export": {"enabled": False},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return bk.config_dict(**base)


def reused(run_dir: Path, cfg: dict[str, Any]) -> bk.ChildRun | None:
    """The completed run in ``run_dir`` if it ran this config (secagg.timeout_s aside)."""
    run = bk.finished_run(run_dir)
    if run is None:
        return None
    ran = json.loads((run_dir / "config.json").read_text())

    def key(c: dict[str, Any]) -> dict[str, Any]:
        sections = ("model", "data", "fleet", "training", "privacy", "lora", "seed")
        out = {k: c.get(k) for k in sections}
        out["secagg"] = c["secagg"]["enabled"]
        return out

    return run if key(ran) == key(cfg) else None


def central(cfg_dict: dict[str, Any], rounds: int) -> dict[str, Any]:
    """Non-DP LoRA on every private training record pooled, evaluated like the coordinator."""
    import torch

    from fedlora import runtime
    from fedlora.client.train import LocalTrainingPlan, train_lora
    from fedlora.config import FedloraConfig
    from fedlora.evaluation import mean_token_loss

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = FedloraConfig.from_dict(cfg_dict)
    fleet = runtime.fleet(cfg)
    bundle = runtime.model_bundle(cfg)
    pooled = tuple(t for d in fleet.devices for t in d.train)
    ids, mask = runtime.encoded(cfg, "central-train", pooled)
    eval_ids, eval_mask = runtime.encoded(cfg, "server-eval", fleet.server_eval)
    t0 = time.perf_counter()
    curve = [mean_token_loss(bundle.model, eval_ids, eval_mask)]
    batch = cfg.training.batch_size * cfg.fleet.devices_per_round
    for r in range(1, rounds + 1):
        plan = LocalTrainingPlan(
            steps=cfg.training.local_steps,
            expected_batch_size=batch,
            learning_rate=cfg.training.learning_rate,
            max_grad_norm=cfg.privacy.max_grad_norm,
            noise_multiplier=None,
            seed=cfg.seed * 1000 + r,
        )
        train_lora(bundle.model, ids, mask, plan)
        curve.append(mean_token_loss(bundle.model, eval_ids, eval_mask))
    runtime.clear()
    return {
        "eval_loss_by_round": curve,
        "train_records": len(pooled),
        "expected_batch": batch,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def fed(run: bk.ChildRun) -> dict[str, Any]:
    out: dict[str, Any] = {
        "eval_loss_by_round": [r["eval_loss"] for r in run.rows],
        "devices_aggregated": [r["num_devices"] for r in run.rows[1:]],
        "wall_s": round(run.wall_s, 1),
        "run_dir": str(run.run_dir),
    }
    privacy = run.summary.get("privacy")
    if privacy:
        out["max_epsilon"] = privacy["max_epsilon"]
        out["budget_epsilon"] = privacy["budget_epsilon"]
        out["delta"] = privacy["delta"]
    return out


def plot(curves: dict[str, list[float]], base: float, path: Path, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.add_subplot()
    ax.axhline(base, color="grey", linestyle=":", label="base (public pretraining only)")
    for name, ys in curves.items():
        style = "--" if name == "central" else ("-." if name.endswith("secagg") else "-")
        ax.plot(range(len(ys)), ys, style, marker="o", markersize=3, label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss on private roles (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bk.setup_env()
    if not PLAY.is_file():
        bk.emit({"bench": "utility", "skipped": f"{PLAY} not found (tinyshakespeare is optional)"})
        return 0
    started = time.perf_counter()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedlora-bench-utility-"))
    public, private = split_play(PLAY, args.public_fraction, args.devices)
    data = write_jsonl(private, out / "private_roles.jsonl")
    bk.log(f"utility: base model on {len(public)} public speeches")
    with bk.stdout_to_stderr():
        model, base_info = build_base(public, args.pretrain_steps, args.seed)
    results: dict[str, dict[str, Any]] = {}
    for name in args.variants:
        cfg = fed_config(args, data, model, **VARIANTS[name])
        run = reused(out / name, cfg) if args.reuse else None
        if run is None:
            bk.log(f"utility: {name}")
            run = bk.simulate_child(cfg, out / name)
        else:
            bk.log(f"utility: {name} reused from {run.run_dir}")
        results[name] = {**fed(run), **({"reused": True} if args.reuse else {})}
    bk.log("utility: central")
    with bk.stdout_to_stderr():
        results["central"] = central(fed_config(args, data, model), args.rounds)
    base = results[HEADLINE]["eval_loss_by_round"][0]
    central_gain = base - results["central"]["eval_loss_by_round"][-1]
    for res in results.values():
        final = res["eval_loss_by_round"][-1]
        res["final_loss"] = final
        res["recovered_share"] = (
            round((base - final) / central_gain, 3) if central_gain > 0 else None
        )
    figure = results[HEADLINE]["recovered_share"]
    note = None
    if args.plot is not None:
        curves = {k: v["eval_loss_by_round"] for k, v in results.items()}
        note = plot(
            curves,
            base,
            args.plot,
            f"tinyshakespeare, {args.devices} private roles, {args.per_round}/round, "
            f"{args.local_steps} local steps; δ = 1e-5",
        )
    roles = sorted({r.device for r in private})
    bk.emit(
        {
            "bench": "utility",
            "figure": figure,
            "unit": "ratio ((base − federated DP ε=8) ÷ (base − centralized non-DP) held-out loss)",
            "comparison": (
                "share of the centralized non-DP LoRA loss reduction recovered by federated "
                f"DP-SGD LoRA at ε = 8, δ = 1e-5 (no SecAgg+), after {args.rounds} rounds, on "
                "held-out speeches of private roles the base never saw"
            ),
            "target": TARGET,
            "meets_target": bool(figure is not None and figure >= TARGET),
            "base_loss": base,
            "final_loss": {k: round(v["final_loss"], 4) for k, v in results.items()},
            "recovered_share": {k: v["recovered_share"] for k, v in results.items()},
            "base_model": {"path": str(model), **base_info},
            "data": {
                "play": str(PLAY),
                "public_fraction": args.public_fraction,
                "public_speeches": len(public),
                "private_roles": len(roles),
                "private_speeches": len(private),
                "roles": roles,
            },
            "schedule": {
                "rounds": args.rounds,
                "devices_per_round": args.per_round,
                "local_steps": args.local_steps,
                "seed": args.seed,
            },
            "variants": results,
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
