"""What does DP-SGD cost per optimizer step? DP-SGD vs plain SGD on the same LoRA model.

For each size it times ``fedlora.client.train.train_lora`` on the same LoRA-wrapped
model, records, batch size and sequence length, three ways:

* ``dp``: DP-SGD as fedlora trains (per-sample gradients from
  ``fedlora.client.train.grad_sampler``, the LoRA path ``LinearGradSampler`` when every
  trainable tensor is a linear weight; Opacus ``DPOptimizer`` clipping to ``C``; Gaussian
  noise ``σ·C`` from the OS-seeded ChaCha20 source, ``InjectedNoiseDPOptimizer``);
* ``dp_opacus``: the same with Opacus' ``GradSampleModule`` for the per-sample
  gradients (``per_sample="opacus"``, what fedlora used before), so before and after
  are measured side by side;
* ``nondp``: ``noise_multiplier=None``, i.e. plain SGD on the same batches.

Batches are fixed, not Poisson: each call gets exactly ``batch`` records with
``expected_batch_size = batch``, so q = 1 and every step sees every record (the
same work for every variant). A call runs ``--steps`` steps and its time / steps
is one sample of s/step; that includes the per-call wrap and unwrap (hooks on, hooks
off), amortised over the steps, as every real round pays it. After a warm-up call of
each, the variants alternate for ``--reps`` repetitions (the order flips every
repetition) so machine noise hits all of them equally, and the median is kept.
Each call is timed twice: wall clock (``ratio``) and this process's CPU time
(``ratio_cpu``). With one torch thread the step's arithmetic all runs on this
process, so CPU time is what the step costs even when other work on a shared
machine preempts it (wall time then counts the waiting too); on an idle machine
the two agree.

Sizes: the embedded default model (``fedlora.model.default_model_path()``) at
batch 8, 16, 32, and a from-config random-init LLaMA (hidden 256, 4 layers) at
batch 16; or, with ``--model PATH`` (a Hugging Face directory or a catalog name such
as ``smollm2-135m-instruct``), that model with the default LoRA settings at
``--batches`` (default 8). Sequence length ``--seq-len`` (64), one torch thread (one
simulated device per core). At the headline size it also splits one step of each
variant into forward, backward (with per-sample gradients), clipping, noise and
update (``breakdown``).

Without ``--quick`` and ``--model`` it also times the same DP step under each of
Opacus' per-sample-gradient modes (``hooks``, what ``dp_opacus`` uses;
``functorch``; ``ew``) and fedlora's ``linear`` against the non-DP step
(``grad_sample_modes_default_b16``).

Prints one JSON object to stdout (library chatter goes to stderr); the headline
``figure`` is the DP / non-DP CPU-time ratio at the default model, batch 16, or at
``--model``'s first batch (``figure_wall`` the wall-clock one, ``figure_opacus`` the
same ratio with Opacus' per-sample gradients).

    .venv/bin/python bench/dp_overhead.py [--quick] [--reps 7] [--steps 8]
    .venv/bin/python bench/dp_overhead.py --model smollm2-135m-instruct [--batches 8,16]
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
from typing import Any, Literal

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
    p.add_argument(
        "--model",
        default=None,
        help="a Hugging Face model directory or catalog name to time instead of the "
        "embedded default and the from-config LLaMA (default LoRA settings)",
    )
    p.add_argument(
        "--batches", default="8", help="with --model: comma-separated batch sizes (default 8)"
    )
    p.add_argument("--seq-len", type=int, default=SEQ_LEN, help=f"tokens per record ({SEQ_LEN})")
    args = p.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error("--batches must be comma-separated integers")
    if args.reps is None:
        args.reps = 3 if args.quick else 7
    if args.steps is None:
        args.steps = 5 if args.quick else 8
    if args.reps < 1 or args.steps < 5 or args.seq_len < 2 or min(args.batches) < 1:
        p.error("--reps, --batches must be >= 1, --steps >= 5 and --seq-len >= 2")
    return args


def records(
    vocab_size: int, batch: int, seed: int, seq_len: int = SEQ_LEN
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random full-length sequences (no padding: the same work per record)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=g)
    return ids, torch.ones_like(ids)


def user_model(name: str) -> tuple[Any, str]:
    """``--model``: a catalog name (converted on first use) or a Hugging Face directory,
    with the default LoRA settings; and what it is, for the JSON."""
    from fedlora.adapter import attach_lora, lora_targets
    from fedlora.catalog import catalog_entry, catalog_model_path
    from fedlora.config import LoraSettings
    from fedlora.model import load_base_model

    path = catalog_model_path(name) if catalog_entry(name) is not None else Path(name)
    model, _ = load_base_model(path)
    model = attach_lora(model, LoraSettings(), seed=0)
    cfg = model.config
    what = (
        f"{name} ({cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}; "
        f"LoRA r=8 on {', '.join(lora_targets(model))})"
    )
    return model, what


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


VARIANTS = ("dp", "dp_opacus", "nondp")


def time_size(
    model: Any, batch: int, reps: int, steps: int, seed: int, seq_len: int = SEQ_LEN
) -> dict[str, Any]:
    """Median s/step of DP (fedlora's and Opacus' per-sample gradients) and non-DP
    ``train_lora`` calls, alternated."""
    from fedlora.client.train import train_lora

    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids, mask = records(vocab, batch, seed, seq_len)

    def call(variant: str) -> tuple[float, float]:
        dp = variant != "nondp"
        mode: Literal["auto", "opacus"] = "opacus" if variant == "dp_opacus" else "auto"
        t0, c0 = time.perf_counter(), time.process_time()
        result = train_lora(model, ids, mask, plan(batch, steps, dp, seed), per_sample=mode)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert result.sample_rate == 1.0 and result.empty_batches == 0
        return elapsed / steps, cpu / steps

    for variant in VARIANTS:  # warm-up: allocator, kernels, hook paths
        call(variant)
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(reps):
        for variant in VARIANTS if rep % 2 == 0 else tuple(reversed(VARIANTS)):
            wall_s, cpu_s = call(variant)
            wall[variant].append(wall_s)
            cpu[variant].append(cpu_s)
    w = {v: statistics.median(x) for v, x in wall.items()}
    c = {v: statistics.median(x) for v, x in cpu.items()}
    return {
        "batch": batch,
        "seq_len": seq_len,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "dp_s_per_step": round(w["dp"], 5),
        "dp_opacus_s_per_step": round(w["dp_opacus"], 5),
        "nondp_s_per_step": round(w["nondp"], 5),
        "ratio": round(w["dp"] / w["nondp"], 3),
        "ratio_opacus": round(w["dp_opacus"] / w["nondp"], 3),
        "dp_cpu_s_per_step": round(c["dp"], 5),
        "dp_opacus_cpu_s_per_step": round(c["dp_opacus"], 5),
        "nondp_cpu_s_per_step": round(c["nondp"], 5),
        "ratio_cpu": round(c["dp"] / c["nondp"], 3),
        "ratio_cpu_opacus": round(c["dp_opacus"] / c["nondp"], 3),
        **{f"{v}_cpu_samples": [round(x, 5) for x in cpu[v]] for v in VARIANTS},
    }


def breakdown(
    model: Any, batch: int, reps: int, seed: int, seq_len: int = SEQ_LEN
) -> dict[str, Any]:
    """Median CPU seconds of each phase of one step: DP with fedlora's per-sample gradients
    (``dp_``), DP with Opacus' (``dp_opacus_``), both with the secure noise ``train_lora``
    draws, and non-DP (``nondp_``), alternated per repetition."""
    from fedlora.client.train import InjectedNoiseDPOptimizer, grad_sampler, sequence_losses
    from fedlora.privacy.noise import SecureRandom

    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids, mask = records(vocab, batch, seed, seq_len)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    times: dict[str, list[float]] = {}

    def tick(name: str, t0: float) -> float:
        t1 = time.process_time()
        times.setdefault(name, []).append(t1 - t0)
        return t1

    def dp_step(prefix: str, mode: str) -> None:
        t = time.process_time()
        sampler = grad_sampler(model, mode)  # type: ignore[arg-type]
        opt = InjectedNoiseDPOptimizer(
            torch.optim.SGD(params, lr=1e-3),
            randomness=SecureRandom(),
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=MAX_GRAD_NORM,
            expected_batch_size=batch,
            loss_reduction="mean",
        )
        opt.zero_grad(set_to_none=True)
        wrap = time.process_time() - t
        t = time.process_time()
        loss = sequence_losses(sampler, ids, mask).sum()
        t = tick(f"{prefix}_forward", t)
        sampler.backward(loss)
        t = tick(f"{prefix}_backward_per_sample_grads", t)
        opt.clip_and_accumulate()
        t = tick(f"{prefix}_clip_and_accumulate", t)
        opt.add_noise()
        t = tick(f"{prefix}_noise", t)
        opt.scale_grad()
        opt.original_optimizer.step()
        t = tick(f"{prefix}_update", t)
        opt.zero_grad(set_to_none=True)
        sampler.close()
        times.setdefault(f"{prefix}_per_call_wrap_unwrap", []).append(
            wrap + time.process_time() - t
        )

    def plain_step(opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        t = time.process_time()
        loss = sequence_losses(model, ids, mask).mean()
        t = tick("nondp_forward", t)
        loss.backward()
        t = tick("nondp_backward", t)
        opt.step()
        tick("nondp_update", t)

    sgd = torch.optim.SGD(params, lr=1e-3)
    for rep in range(reps + 1):  # repetition 0 is warm-up
        steps = [lambda: dp_step("dp", "auto"), lambda: dp_step("dp_opacus", "opacus")]
        steps.append(lambda: plain_step(sgd))
        for step in steps if rep % 2 == 0 else reversed(steps):
            step()
        if rep == 0:
            times.clear()
    sgd.zero_grad(set_to_none=True)
    model.eval()
    med = {k: statistics.median(v) for k, v in times.items()}

    def total(prefix: str) -> float:
        phases: tuple[str, ...] = ("forward", "backward", "update")
        if prefix != "nondp":
            phases = ("forward", "backward_per_sample_grads", "clip_and_accumulate")
            phases += ("noise", "update")
        return sum(med[f"{prefix}_{phase}"] for phase in phases)

    out: dict[str, Any] = {k: round(v, 5) for k, v in sorted(med.items())}
    for prefix in ("dp", "dp_opacus", "nondp"):
        out[f"{prefix}_total"] = round(total(prefix), 5)
    out["ratio"] = round(total("dp") / total("nondp"), 3)
    out["ratio_opacus"] = round(total("dp_opacus") / total("nondp"), 3)
    out["note"] = (
        f"CPU seconds of one step at batch {batch}, seq_len {seq_len}, median of {reps}; "
        "the totals exclude zero_grad and *_per_call_wrap_unwrap (hooks on, optimizer, "
        "hooks off: paid once per train_lora call, not per step); noise is "
        "InjectedNoiseDPOptimizer.add_noise with SecureRandom, as train_lora draws it"
    )
    return out


def grad_sample_modes(model: Any, batch: int, reps: int, steps: int, seed: int) -> dict[str, Any]:
    """s/step of DP-SGD under each way of getting per-sample gradients vs plain SGD, alternated.

    ``linear`` is what ``train_lora`` uses for a LoRA adapter (``LinearGradSampler``);
    ``hooks`` is Opacus' ``GradSampleModule`` (what it used before); ``functorch`` (vmap
    over the model) and ``ew`` (ExpandedWeights) are Opacus' other per-sample modes;
    ``ghost`` is Opacus' fast gradient clipping with ghost norms
    (``GradSampleModuleFastGradientClipping`` + ``DPOptimizerFastGradientClipping``):
    per-sample norms without per-sample gradients, then a second backward pass of the
    loss reweighted by the clipping factors. Every mode draws Opacus' torch noise here
    (the comparison is of the per-sample part). A mode that cannot run this model is
    listed with its error.
    """
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.grad_sample.utils import prepare_module
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    from fedlora.client.train import grad_sampler, sequence_losses

    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids, mask = records(vocab, batch, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    dp_kwargs = {
        "noise_multiplier": NOISE_MULTIPLIER,
        "max_grad_norm": MAX_GRAD_NORM,
        "expected_batch_size": batch,
        "loss_reduction": "mean",
        "generator": torch.Generator().manual_seed(seed + 1),
    }

    def call(mode: str) -> float:
        t0 = time.perf_counter()
        net: Any = model
        close: Any = None
        if mode == "nondp":
            opt: Any = torch.optim.SGD(params, lr=1e-3)
        elif mode == "ghost":
            net = GradSampleModuleFastGradientClipping(
                model, batch_first=True, loss_reduction="sum", max_grad_norm=MAX_GRAD_NORM
            )
            opt = DPOptimizerFastGradientClipping(torch.optim.SGD(params, lr=1e-3), **dp_kwargs)
            close = net._close
        elif mode == "linear":
            net = grad_sampler(model)
            opt = DPOptimizer(torch.optim.SGD(params, lr=1e-3), **dp_kwargs)
            close = net.close
        else:
            net = prepare_module(model, mode, batch_first=True, loss_reduction="sum")
            opt = DPOptimizer(torch.optim.SGD(params, lr=1e-3), **dp_kwargs)
            close = net._close
        model.train()
        try:
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                per_seq = sequence_losses(net, ids, mask)
                if mode == "nondp":
                    per_seq.mean().backward()
                elif mode == "linear":
                    net.backward(per_seq.sum())
                elif mode == "ghost":  # what DPTensorFastGradientClipping.backward does
                    per_seq.sum().backward(retain_graph=True)
                    opt.zero_grad()
                    coeff = net.get_clipping_coef()
                    net.disable_hooks()
                    (coeff * per_seq).sum().backward()
                    net.enable_hooks()
                else:
                    per_seq.sum().backward()
                opt.step()
        finally:
            opt.zero_grad(set_to_none=True)
            if close is not None:
                close()
            model.eval()
        return (time.perf_counter() - t0) / steps

    modes, errors = [], {}
    for mode in ("nondp", "linear", "hooks", "ghost", "functorch", "ew"):
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


def measure_default(args: argparse.Namespace) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """The embedded default at batch 8, 16, 32 and the from-config LLaMA at batch 16."""
    sizes: dict[str, Any] = {}
    model = default_model()
    for batch in DEFAULT_BATCHES:
        sizes[f"default_b{batch}"] = {
            "model": "embedded default (fedlora.model.default_model_path)",
            **time_size(model, batch, args.reps, args.steps, args.seed, args.seq_len),
        }
    extra: dict[str, Any] = {
        f"breakdown_default_b{HEADLINE_BATCH}": breakdown(
            model, HEADLINE_BATCH, args.reps, args.seed, args.seq_len
        )
    }
    if not args.quick:
        extra[f"grad_sample_modes_default_b{HEADLINE_BATCH}"] = grad_sample_modes(
            model, HEADLINE_BATCH, args.reps, args.steps, args.seed
        )
    del model
    big = large_model(args.seed)
    sizes[f"llama_h{LARGE['hidden_size']}_l{LARGE['num_layers']}_b{LARGE_BATCH}"] = {
        "model": "from-config LlamaForCausalLM, random init, "
        + ", ".join(f"{k}={v}" for k, v in LARGE.items()),
        **time_size(big, LARGE_BATCH, args.reps, args.steps, args.seed, args.seq_len),
    }
    return sizes, f"default_b{HEADLINE_BATCH}", extra


def measure_model(args: argparse.Namespace) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """``--model`` at each of ``--batches``, with a breakdown at the first."""
    model, what = user_model(args.model)
    sizes = {
        f"model_b{batch}": {
            "model": what,
            **time_size(model, batch, args.reps, args.steps, args.seed, args.seq_len),
        }
        for batch in args.batches
    }
    first = args.batches[0]
    split = breakdown(model, first, args.reps, args.seed, args.seq_len)
    return sizes, f"model_b{first}", {f"breakdown_model_b{first}": split}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("FEDLORA_CACHE", "/tmp/fc")
    torch.set_num_threads(1)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        sizes, key, extra = measure_model(args) if args.model else measure_default(args)
    headline = sizes[key]
    figure = headline["ratio_cpu"]
    where = (
        f"{headline['model']}, batch {headline['batch']}"
        if args.model
        else f"the default model, batch {HEADLINE_BATCH}"
    )
    result = {
        "bench": "dp_overhead",
        "figure": figure,
        "unit": "ratio (DP-SGD CPU s/step ÷ non-DP CPU s/step, one torch thread)",
        "figure_wall": headline["ratio"],
        "figure_opacus": headline["ratio_cpu_opacus"],
        "comparison": (
            "fedlora.client.train.train_lora with noise_multiplier="
            f"{NOISE_MULTIPLIER} (fedlora's per-sample grads, Opacus clipping to "
            f"C={MAX_GRAD_NORM}, secure Gaussian noise) vs noise_multiplier=None (plain SGD), "
            f"same LoRA model, records, batch and seq_len {args.seq_len}; figure_opacus: the "
            f"same with Opacus' GradSampleModule (per_sample='opacus'); at {where}"
        ),
        "target": TARGET,
        "meets_target": bool(figure <= TARGET),
        "method": (
            f"train_lora called with expected_batch_size = number of records (q = 1: fixed "
            f"full batches, no Poisson variation), {args.steps} steps per call, s/step = "
            f"call time / steps (includes the per-call wrap/unwrap), as process CPU "
            f"time (figure, ratio_cpu: what the step costs, unaffected by other work on a "
            f"shared machine) and wall time (figure_wall, ratio); one warm-up "
            f"call each, then {args.reps} alternating repetitions of dp, dp_opacus and nondp "
            "(order flips each rep), median; torch.set_num_threads(1)"
        ),
        "sizes": sizes,
        **extra,
        "env": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "quick": args.quick,
            "model": args.model,
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
