"""What does DP-SGD cost per optimizer step? DP-SGD vs plain SGD on the same LoRA model.

For each size it times ``fedlora.client.train.train_lora`` twice on the same LoRA-wrapped
model, records, batch size and sequence length:

* ``dp``: DP-SGD (Opacus ``GradSampleModule`` per-sample gradients + ``DPOptimizer``
  clipping to ``C`` and Gaussian noise ``σ·C``);
* ``nondp``: ``noise_multiplier=None``, i.e. plain SGD on the same batches.

Batches are fixed, not Poisson: each call gets exactly ``batch`` records with
``expected_batch_size = batch``, so q = 1 and every step sees every record (the
same work for both variants). A call runs ``--steps`` steps and its time / steps
is one sample of s/step; that includes the per-call Opacus wrap and unwrap,
amortised over the steps, as every real round pays it. After a warm-up call of
each, the two variants alternate for ``--reps`` repetitions (the order flips
every repetition) so machine noise hits both equally, and the median is kept.
Each call is timed twice: wall clock (``ratio``) and this process's CPU time
(``ratio_cpu``). With one torch thread the step's arithmetic all runs on this
process, so CPU time is what the step costs even when other work on a shared
machine preempts it (wall time then counts the waiting too); on an idle machine
the two agree.

Sizes: the embedded default model (``fedlora.model.default_model_path()``) at
batch 8, 16, 32, and a from-config random-init LLaMA (hidden 256, 4 layers) at
batch 16; sequence length 64 throughout, one torch thread (one simulated device
per core). At the default model and batch 16 it also splits one DP step into
forward, backward, clipping and noise+update, against the non-DP forward and
backward (``breakdown``).

Without ``--quick`` it also times the same DP step under each of Opacus'
per-sample-gradient modes (``hooks``, which ``train_lora`` uses; ``functorch``;
``ew``) against the non-DP step (``grad_sample_modes_default_b16``).

Prints one JSON object to stdout (library chatter goes to stderr); the headline
``figure`` is the DP / non-DP CPU-time ratio at the default model, batch 16
(``figure_wall`` the wall-clock one).

    .venv/bin/python bench/dp_overhead.py [--quick] [--reps 7] [--steps 8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SEQ_LEN = 64
DEFAULT_BATCHES = (8, 16, 32)
HEADLINE_BATCH = 16
LARGE = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 688}
LARGE_BATCH = 16
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
TARGET = 1.10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/dp_overhead.py",
        description=(
            "Seconds per optimizer step of DP-SGD vs plain SGD on the same LoRA model, "
            "batch and sequence length: prints one JSON object with the ratios."
        ),
    )
    p.add_argument("--quick", action="store_true", help="fewer repetitions and steps")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7, quick 3)")
    p.add_argument("--steps", type=int, default=None, help="steps per call (default 8, quick 5)")
    p.add_argument("--seed", type=int, default=0, help="seed for records, LoRA init and noise")
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 3 if args.quick else 7
    if args.steps is None:
        args.steps = 5 if args.quick else 8
    if args.reps < 1 or args.steps < 5:
        p.error("--reps must be >= 1 and --steps >= 5")
    return args


def records(vocab_size: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random full-length sequences (no padding: the same work per record)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, SEQ_LEN), generator=g)
    return ids, torch.ones_like(ids)


def default_model() -> Any:
    from fedlora.adapter import attach_lora
    from fedlora.config import LoraSettings
    from fedlora.model import default_model_path, load_base_model

    model, _ = load_base_model(default_model_path())
    return attach_lora(model, LoraSettings(), seed=0)


def large_model(seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedlora.adapter import attach_lora
    from fedlora.config import LoraSettings

    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=LARGE["hidden_size"],
        num_hidden_layers=LARGE["num_layers"],
        num_attention_heads=LARGE["num_heads"],
        num_key_value_heads=LARGE["num_heads"],
        intermediate_size=LARGE["intermediate_size"],
        max_position_embeddings=256,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    return attach_lora(model, LoraSettings(), seed=0)


def plan(batch: int, steps: int, dp: bool, seed: int) -> Any:
    from fedlora.client.train import LocalTrainingPlan

    return LocalTrainingPlan(
        steps=steps,
        expected_batch_size=batch,  # = number of records, so q = 1: fixed full batches
        learning_rate=1e-3,
        max_grad_norm=MAX_GRAD_NORM,
        noise_multiplier=NOISE_MULTIPLIER if dp else None,
        seed=seed,
    )


def time_size(model: Any, batch: int, reps: int, steps: int, seed: int) -> dict[str, Any]:
    """Median s/step of DP and non-DP ``train_lora`` calls, alternated."""
    from fedlora.client.train import train_lora

    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids, mask = records(vocab, batch, seed)

    def call(dp: bool) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        result = train_lora(model, ids, mask, plan(batch, steps, dp, seed))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert result.sample_rate == 1.0 and result.empty_batches == 0
        return elapsed / steps, cpu / steps

    for dp in (True, False):  # warm-up: allocator, kernels, Opacus hook paths
        call(dp)
    samples: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    for rep in range(reps):
        for dp in (True, False) if rep % 2 == 0 else (False, True):
            wall_s, cpu_s = call(dp)
            samples[dp].append(wall_s)
            cpu[dp].append(cpu_s)
    dp_s, nondp_s = statistics.median(samples[True]), statistics.median(samples[False])
    dp_cpu, nondp_cpu = statistics.median(cpu[True]), statistics.median(cpu[False])
    return {
        "batch": batch,
        "seq_len": SEQ_LEN,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "dp_s_per_step": round(dp_s, 5),
        "nondp_s_per_step": round(nondp_s, 5),
        "ratio": round(dp_s / nondp_s, 3),
        "dp_cpu_s_per_step": round(dp_cpu, 5),
        "nondp_cpu_s_per_step": round(nondp_cpu, 5),
        "ratio_cpu": round(dp_cpu / nondp_cpu, 3),
        "dp_samples": [round(s, 5) for s in samples[True]],
        "nondp_samples": [round(s, 5) for s in samples[False]],
    }


def breakdown(model: Any, batch: int, reps: int, seed: int) -> dict[str, Any]:
    """Median seconds of each phase of one step, DP (Opacus pieces as train_lora uses them)
    and non-DP, alternated per repetition."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from fedlora.client.train import per_sequence_loss

    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids, mask = records(vocab, batch, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    times: dict[str, list[float]] = {}

    def tick(name: str, t0: float) -> float:
        t1 = time.perf_counter()
        times.setdefault(name, []).append(t1 - t0)
        return t1

    def dp_step(net: Any, opt: Any) -> None:
        opt.zero_grad(set_to_none=True)
        t = time.perf_counter()
        out = net(input_ids=ids, attention_mask=mask, use_cache=False)
        loss = per_sequence_loss(out.logits, ids, mask).sum()
        t = tick("dp_forward", t)
        loss.backward()  # autograd + Opacus per-sample-gradient hooks
        t = tick("dp_backward_per_sample_grads", t)
        opt.clip_and_accumulate()
        t = tick("dp_clip_and_accumulate", t)
        opt.add_noise()
        opt.scale_grad()
        opt.original_optimizer.step()
        tick("dp_noise_and_update", t)

    def plain_step(opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        t = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        loss = per_sequence_loss(out.logits, ids, mask).mean()
        t = tick("nondp_forward", t)
        loss.backward()
        t = tick("nondp_backward", t)
        opt.step()
        tick("nondp_update", t)

    sgd = torch.optim.SGD(params, lr=1e-3)
    for rep in range(reps + 1):  # repetition 0 is warm-up
        t_wrap = time.perf_counter()
        net = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        dp_opt = DPOptimizer(
            torch.optim.SGD(params, lr=1e-3),
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=MAX_GRAD_NORM,
            expected_batch_size=batch,
            loss_reduction="mean",
            generator=torch.Generator().manual_seed(seed + 1),
        )
        wrap_s = time.perf_counter() - t_wrap
        dp_step(net, dp_opt)
        t_close = time.perf_counter()
        dp_opt.zero_grad(set_to_none=True)
        net._close()
        times.setdefault("per_call_wrap_unwrap", []).append(wrap_s + time.perf_counter() - t_close)
        plain_step(sgd)
        if rep == 0:
            times.clear()
    sgd.zero_grad(set_to_none=True)
    model.eval()
    med = {k: statistics.median(v) for k, v in times.items()}
    dp_total = sum(v for k, v in med.items() if k.startswith("dp_"))  # not per-call wrap
    nondp_total = sum(v for k, v in med.items() if k.startswith("nondp_"))
    out: dict[str, Any] = {k: round(v, 5) for k, v in med.items()}
    out["dp_total"] = round(dp_total, 5)
    out["nondp_total"] = round(nondp_total, 5)
    out["ratio"] = round(dp_total / nondp_total, 3)
    out["note"] = (
        f"one step at batch {batch}, seq_len {SEQ_LEN}, median of {reps}; dp_/nondp_ totals "
        "exclude zero_grad and per_call_wrap_unwrap (GradSampleModule + DPOptimizer setup "
        "and _close, paid once per train_lora call, not per step)"
    )
    return out


def grad_sample_modes(model: Any, batch: int, reps: int, steps: int, seed: int) -> dict[str, Any]:
    """s/step of DP-SGD under each Opacus per-sample-gradient mode vs plain SGD, alternated.

    ``hooks`` is what ``train_lora`` uses; ``functorch`` (vmap over the model) and ``ew``
    (ExpandedWeights) are the alternatives Opacus 1.6 offers without ghost clipping. A mode
    that cannot run this model is listed with its error.
    """
    from opacus.grad_sample.utils import prepare_module
    from opacus.optimizers import DPOptimizer

    from fedlora.client.train import per_sequence_loss

    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids, mask = records(vocab, batch, seed)
    params = [p for p in model.parameters() if p.requires_grad]

    def call(mode: str) -> float:
        t0 = time.perf_counter()
        if mode == "nondp":
            opt: Any = torch.optim.SGD(params, lr=1e-3)
            net: Any = model
        else:
            net = prepare_module(model, mode, batch_first=True, loss_reduction="sum")
            opt = DPOptimizer(
                torch.optim.SGD(params, lr=1e-3),
                noise_multiplier=NOISE_MULTIPLIER,
                max_grad_norm=MAX_GRAD_NORM,
                expected_batch_size=batch,
                loss_reduction="mean",
                generator=torch.Generator().manual_seed(seed + 1),
            )
        net.train()
        try:
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                out = net(input_ids=ids, attention_mask=mask, use_cache=False)
                per_seq = per_sequence_loss(out.logits, ids, mask)
                (per_seq.mean() if mode == "nondp" else per_seq.sum()).backward()
                opt.step()
        finally:
            opt.zero_grad(set_to_none=True)
            if mode != "nondp":
                net._close()
            model.eval()
        return (time.perf_counter() - t0) / steps

    modes, errors = [], {}
    for mode in ("nondp", "hooks", "functorch", "ew"):
        try:
            call(mode)  # warm-up, and does it run at all
            modes.append(mode)
        except Exception as err:  # report it, don't stop the bench
            errors[mode] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    samples: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(reps):
        for mode in modes if rep % 2 == 0 else list(reversed(modes)):
            samples[mode].append(call(mode))
    med = {m: statistics.median(v) for m, v in samples.items()}
    return {
        "batch": batch,
        "s_per_step": {m: round(v, 5) for m, v in med.items()},
        "ratio_vs_nondp": {m: round(v / med["nondp"], 3) for m, v in med.items()},
        "unsupported": errors,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("FEDLORA_CACHE", "/tmp/fc")
    torch.set_num_threads(1)
    started = time.perf_counter()
    sizes: dict[str, Any] = {}
    with contextlib.redirect_stdout(sys.stderr):
        model = default_model()
        for batch in DEFAULT_BATCHES:
            sizes[f"default_b{batch}"] = {
                "model": "embedded default (fedlora.model.default_model_path)",
                **time_size(model, batch, args.reps, args.steps, args.seed),
            }
        split = breakdown(model, HEADLINE_BATCH, args.reps, args.seed)
        modes = (
            None
            if args.quick
            else grad_sample_modes(model, HEADLINE_BATCH, args.reps, args.steps, args.seed)
        )
        del model
        big = large_model(args.seed)
        sizes[f"llama_h{LARGE['hidden_size']}_l{LARGE['num_layers']}_b{LARGE_BATCH}"] = {
            "model": "from-config LlamaForCausalLM, random init, "
            + ", ".join(f"{k}={v}" for k, v in LARGE.items()),
            **time_size(big, LARGE_BATCH, args.reps, args.steps, args.seed),
        }
    headline = sizes[f"default_b{HEADLINE_BATCH}"]
    figure = headline["ratio_cpu"]
    result = {
        "bench": "dp_overhead",
        "figure": figure,
        "unit": "ratio (DP-SGD CPU s/step ÷ non-DP CPU s/step, one torch thread)",
        "figure_wall": headline["ratio"],
        "comparison": (
            "fedlora.client.train.train_lora with noise_multiplier="
            f"{NOISE_MULTIPLIER} (Opacus per-sample grads, clip C={MAX_GRAD_NORM}, Gaussian "
            "noise) vs noise_multiplier=None (plain SGD), same LoRA model, records, batch "
            f"and seq_len {SEQ_LEN}; figure at the default model, batch {HEADLINE_BATCH}"
        ),
        "target": TARGET,
        "meets_target": bool(figure <= TARGET),
        "method": (
            f"train_lora called with expected_batch_size = number of records (q = 1: fixed "
            f"full batches, no Poisson variation), {args.steps} steps per call, s/step = "
            f"call time / steps (includes the per-call Opacus wrap/unwrap), as process CPU "
            f"time (figure, ratio_cpu: what the step costs, unaffected by other work on a "
            f"shared machine) and wall time (figure_wall, ratio); one warm-up "
            f"call each, then {args.reps} alternating repetitions (order flips each rep), "
            "median; torch.set_num_threads(1)"
        ),
        "sizes": sizes,
        "breakdown_default_b16": split,
        **({"grad_sample_modes_default_b16": modes} if modes else {}),
        "env": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "quick": args.quick,
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
