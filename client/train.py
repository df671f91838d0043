"""Local DP-SGD training of a LoRA adapter on one device's records.

Reads like Opacus' front door: take the LoRA-wrapped model → make it private
(per-sample gradients on the adapter tensors only) → train ``steps`` Poisson
batches → report what was spent. The privacy unit is one record = one
training sequence, so the loss is a per-sequence masked mean summed over the
batch (HF's ``labels=`` loss averages tokens across the batch and couples
samples, which breaks the per-sample sensitivity bound).

Per-sample gradients come from :class:`LinearGradSampler` when every trainable tensor
is a linear layer's weight (a LoRA adapter's ``lora_A``/``lora_B``), and from Opacus'
``GradSampleModule`` otherwise; both are exact, and Opacus' ``DPOptimizer`` clips
and accumulates them either way.

With DP, the Poisson batches and the Gaussian noise both come from the plan's
:class:`fedlora.privacy.noise.RandomSource`, by default a fresh OS-seeded CSPRNG: whoever
sees the update (or knows the run's seed) cannot tell which records were sampled
nor subtract the noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from fedlora.privacy.events import poisson_sample_rate
from fedlora.privacy.noise import RandomSource, SecureRandom


@dataclass(frozen=True)
class LocalTrainingPlan:
    """What one device does in one round. ``noise_multiplier`` None means no DP.

    ``randomness`` is where the Poisson batches and (with DP) the Gaussian noise come
    from. None: with DP, a fresh :class:`~fedlora.privacy.noise.SecureRandom` per call of
    :func:`train_lora`; without DP, a torch generator seeded with ``seed`` (plain
    training protects nothing, and stays reproducible). ``seed`` is used for nothing else.
    """

    steps: int
    expected_batch_size: int
    learning_rate: float
    max_grad_norm: float
    noise_multiplier: float | None
    seed: int
    randomness: RandomSource | None = field(default=None, compare=False, repr=False)

    def sample_rate(self, num_records: int) -> float:
        """Poisson sampling rate q = B / N, capped at 1."""
        return poisson_sample_rate(self.expected_batch_size, num_records)


@dataclass(frozen=True)
class LocalTrainingResult:
    steps: int
    sample_rate: float
    noise_multiplier: float | None
    mean_loss: float
    empty_batches: int
    num_records: int


def per_sequence_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Next-token cross-entropy, averaged over each sequence's real tokens.

    Returns a ``[batch]`` tensor: one loss per sequence, independent of every
    other sequence in the batch. A sequence with no target token (length ≤ 1)
    contributes 0.
    """
    shift_logits = logits[:, :-1, :]
    targets = input_ids[:, 1:]
    mask = attention_mask[:, 1:].to(shift_logits.dtype)
    token_loss = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        targets.reshape(-1),
        reduction="none",
    ).view_as(targets)
    per_seq = (token_loss * mask).sum(dim=1)
    return per_seq / mask.sum(dim=1).clamp(min=1.0)


def sequence_losses(
    forward: Callable[..., Any], input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The ``[batch]`` per-sequence losses of a forward pass (``forward`` is the model or
    the per-sample-gradient wrapper around it)."""
    out = forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return per_sequence_loss(out.logits, input_ids, attention_mask)


class GradSampler(Protocol):
    """Computes ``p.grad_sample`` (``[batch, *p.shape]``) for every trainable tensor."""

    def __call__(self, **inputs: Any) -> Any: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def close(self) -> None: ...


class LinearGradSampler:
    """Exact per-sample gradients of the trainable linear layers (a LoRA adapter's).

    What Opacus' ``GradSampleModule`` computes, for less. Opacus puts a forward hook and
    a full backward hook on every trainable module (on SmolLM2-135M's adapter, 420 full
    backward hooks, each wrapping its module's inputs and outputs in extra autograd
    nodes), and its backward also forms every weight's summed gradient, which DP-SGD
    never reads: with LoRA's rank-r matrices those skinny matmuls cost as much as the
    per-sample gradients themselves. Here forward hooks record each layer's input and
    output, and one ``torch.autograd.grad`` call asks for the gradients of the narrow
    outputs (a ``lora_A``'s, r wide); a wide output (a ``lora_B``'s) hands its gradient
    over through a plain tensor hook on the way. Each weight's per-sample gradient is
    then ``grad_output[n]ᵀ · input[n]`` (Opacus' linear rule), one batched matmul with
    the narrow side first. With the loss a sum of per-sequence losses, that is each
    sequence's own gradient. Only narrow outputs are held beyond what autograd keeps.

    Use :func:`grad_sampler`, which checks that every trainable tensor is covered.
    """

    def __init__(self, model: nn.Module, layers: list[nn.Linear]) -> None:
        self.model = model
        self._layers = layers
        # per layer, per call in the forward pass: [input, output or None, output's gradient]
        self._seen: dict[nn.Module, list[list[torch.Tensor | None]]] = {}
        self._handles = [m.register_forward_hook(self._record) for m in layers]

    def _record(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x = inputs[0]
        narrow = output.shape[-1] <= x.shape[-1]
        slot: list[torch.Tensor | None] = [x, output if narrow else None, None]
        self._seen.setdefault(module, []).append(slot)
        if output.requires_grad and not narrow:

            def keep(grad: torch.Tensor) -> None:
                slot[2] = grad

            output.register_hook(keep)

    def __call__(self, **inputs: Any) -> Any:
        self._seen = {}
        return self.model(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        """Set every weight's ``grad_sample`` from one backward pass of ``loss``."""
        seen, self._seen = self._seen, {}
        if not seen:
            raise RuntimeError("backward() before a forward pass through the sampler")
        slots = [slot for calls in seen.values() for slot in calls]
        narrow = [s for s in slots if s[1] is not None and s[1].requires_grad]
        asked = {id(s[1]) for s in narrow}
        # A wide output's hook fires only if autograd passes through it on the way to
        # something asked for: true when its input is a narrow output (lora_B after
        # lora_A). Any other wide layer is made sure of by asking for its weight.
        extra = [
            m.weight
            for m in self._layers
            if any(s[1] is None and id(s[0]) not in asked for s in seen.get(m, []))
        ]
        targets: list[torch.Tensor] = [t for s in narrow if (t := s[1]) is not None]
        targets += extra
        grads = torch.autograd.grad(loss, targets, allow_unused=True)  # fires the hooks
        for slot, grad in zip(narrow, grads, strict=False):
            slot[2] = grad
        batch = int(slots[0][0].shape[0])  # type: ignore[union-attr]
        for module in self._layers:
            weight = module.weight
            sample: torch.Tensor | None = None
            for x, _, g in seen.get(module, []):
                if g is None or x is None:  # an output the loss does not depend on
                    continue
                gs = _per_sample_linear(g, x)
                sample = gs if sample is None else sample + gs
            if sample is None:  # every sample's gradient is zero
                sample = weight.new_zeros((batch, *weight.shape))
            weight.grad_sample = sample  # type: ignore[attr-defined]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._seen = [], {}


def _per_sample_linear(grad_output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``[n, out, in]``: ``einsum("n...o,n...i->noi")``, as one batched matmul whose
    output rows are the narrow side (twice as fast as einsum's choice for rank-8 LoRA)."""
    n = grad_output.shape[0]
    g = grad_output.reshape(n, -1, grad_output.shape[-1]).to(inputs.dtype)
    x = inputs.detach().reshape(n, -1, inputs.shape[-1])
    if g.shape[-1] <= x.shape[-1]:
        return torch.bmm(g.transpose(1, 2), x)
    return torch.bmm(x.transpose(1, 2), g).transpose(1, 2)


class OpacusGradSampler:
    """Opacus' ``GradSampleModule`` (hooks mode) behind the :class:`GradSampler` interface."""

    def __init__(self, model: nn.Module) -> None:
        self.net = GradSampleModule(model, batch_first=True, loss_reduction="sum")

    def __call__(self, **inputs: Any) -> Any:
        return self.net(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def close(self) -> None:
        self.net._close()  # remove Opacus hooks; the model stays usable


def grad_sampler(model: nn.Module, mode: Literal["auto", "opacus"] = "auto") -> GradSampler:
    """Per-sample gradients for ``model``'s trainable tensors (the loss must be a sum over
    the batch): :class:`LinearGradSampler` when they are all bias-free linear weights and
    ``mode`` is ``"auto"``, Opacus' ``GradSampleModule`` otherwise."""
    if mode not in ("auto", "opacus"):
        raise ValueError(f"per-sample gradient mode must be 'auto' or 'opacus', got {mode!r}")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    layers = [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear)
        and m.weight.requires_grad
        and (m.bias is None or not m.bias.requires_grad)
    ]
    weights = {id(m.weight) for m in layers}
    if mode == "auto" and weights == trainable and len(weights) == len(layers):
        return LinearGradSampler(model, layers)
    return OpacusGradSampler(model)


def poisson_batches(
    num_records: int,
    sample_rate: float,
    steps: int,
    randomness: torch.Generator | RandomSource,
) -> list[torch.Tensor]:
    """Indices of ``steps`` Poisson-sampled batches: each record joins each batch w.p. q.

    Batches may be empty; that is part of the mechanism the accountant analyses. The
    draws come from ``randomness``: a :class:`~fedlora.privacy.noise.RandomSource` (DP training)
    or a seeded torch generator (plain training).
    """
    if isinstance(randomness, torch.Generator):
        return [
            torch.nonzero(torch.rand(num_records, generator=randomness) < sample_rate).flatten()
            for _ in range(steps)
        ]
    return [
        torch.from_numpy(np.flatnonzero(randomness.bernoulli(sample_rate, num_records)))
        for _ in range(steps)
    ]


class InjectedNoiseDPOptimizer(DPOptimizer):
    """Opacus' :class:`DPOptimizer` with its Gaussian noise drawn from a ``RandomSource``.

    Only :meth:`add_noise` changes: every parameter's summed clipped gradient gets noise
    of std σ·C, drawn by ``randomness.gaussian`` (in float64, cast to the gradient's
    dtype) instead of ``torch.normal`` on Opacus' generator. Clipping, accumulation,
    the scaling for ``loss_reduction``, step skipping and hooks are Opacus' own.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, randomness: RandomSource, **kwargs):
        super().__init__(optimizer, **kwargs)
        self.randomness = randomness

    def scale_grad(self) -> None:
        """Opacus' scaling (divide by B times the accumulated iterations), with that count
        taken once: Opacus recounts it over every parameter for every parameter (420² checks
        a step on SmolLM2-135M's adapter, about 35 ms)."""
        if self.loss_reduction == "mean":
            divisor = self.expected_batch_size * self.accumulated_iterations
            for p in self.params:
                p.grad /= divisor

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            summed = p.summed_grad
            _check_processed_flag(summed)
            draws = self.randomness.gaussian(summed.numel(), std)
            noise = torch.from_numpy(draws).to(dtype=summed.dtype).view(summed.shape)
            p.grad = (summed + noise).view_as(p)
            _mark_as_processed(summed)


class _TierColumns:
    """The columns ``rank:`` of every trainable ``lora_B``, kept out of training."""

    def __init__(self, model: nn.Module, rank: int | None) -> None:
        self.rank = rank
        self.frozen: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        if rank is None:
            return
        for name, p in model.named_parameters():
            if p.requires_grad and ".lora_B." in name and p.shape[-1] > rank:
                self.frozen.append((p, p.detach()[:, rank:].clone()))

    def zero_gradients(self) -> None:
        for p, _ in self.frozen:
            sample = getattr(p, "grad_sample", None)
            if sample is not None:
                sample[..., self.rank :] = 0
            if p.grad is not None:
                p.grad[:, self.rank :] = 0

    def restore(self) -> None:
        with torch.no_grad():
            for p, kept in self.frozen:
                p[:, self.rank :] = kept


def train_lora(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    plan: LocalTrainingPlan,
    *,
    per_sample: Literal["auto", "opacus"] = "auto",
    rank: int | None = None,
) -> LocalTrainingResult:
    """Train the model's trainable (LoRA) parameters in place for ``plan.steps`` steps.

    With a noise multiplier, every step clips each sequence's gradient to
    ``max_grad_norm`` and adds Gaussian noise of std ``σ·C`` (Opacus'
    ``DPOptimizer``, noise from :class:`InjectedNoiseDPOptimizer`); an empty Poisson
    batch still takes a noise-only step.
    Without one, it is plain SGD on Poisson batches (for non-private baselines).
    The batches and the noise come from ``plan.randomness`` (see :class:`LocalTrainingPlan`).
    ``per_sample`` picks how per-sample gradients are computed (:func:`grad_sampler`);
    ``"opacus"`` forces Opacus' ``GradSampleModule``, for comparisons.
    ``rank`` (a device tier with FFA-LoRA's nested ranks): only the first ``rank`` columns
    of every trainable ``lora_B`` train; the others keep their values. Their (per-sample)
    gradients are zeroed before clipping, so the clipping norm is spent on what trains,
    and the noise DP-SGD adds to them is discarded (post-processing).
    """
    num_records = int(input_ids.shape[0])
    q = plan.sample_rate(num_records)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters: attach a LoRA adapter first")
    tier = _TierColumns(model, rank)

    dp = plan.noise_multiplier is not None
    base_optimizer = torch.optim.SGD(params, lr=plan.learning_rate)
    sampler: GradSampler | None = None
    optimizer: torch.optim.Optimizer
    randomness: torch.Generator | RandomSource
    if dp:
        source = plan.randomness if plan.randomness is not None else SecureRandom()
        randomness = source
        sampler = grad_sampler(model, per_sample)
        optimizer = InjectedNoiseDPOptimizer(
            base_optimizer,
            randomness=source,
            noise_multiplier=float(plan.noise_multiplier),  # type: ignore[arg-type]
            max_grad_norm=plan.max_grad_norm,
            expected_batch_size=max(1, round(q * num_records)),
            # Per-sample grads are exact (GradSampleModule "sum"); "mean" here divides the
            # noisy sum of clipped grads by the *expected* batch size B = q·N, as DP-SGD does.
            loss_reduction="mean",
        )
    else:
        optimizer = base_optimizer
        seeded = torch.Generator().manual_seed(plan.seed)
        randomness = plan.randomness if plan.randomness is not None else seeded

    model.train()
    losses: list[float] = []
    empty = 0
    try:
        for batch in poisson_batches(num_records, q, plan.steps, randomness):
            optimizer.zero_grad(set_to_none=True)
            if batch.numel() == 0:
                empty += 1
                if dp:
                    # Noise-only step: zero per-sample gradients for an empty batch.
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)  # type: ignore[attr-defined]
                    optimizer.step()
                    tier.restore()
                continue
            ids, mask = input_ids[batch], attention_mask[batch]
            if sampler is not None:
                per_seq = sequence_losses(sampler, ids, mask)
                sampler.backward(per_seq.sum())  # per-sample grads need the sum
            else:
                per_seq = sequence_losses(model, ids, mask)
                per_seq.mean().backward()
            tier.zero_gradients()
            optimizer.step()
            tier.restore()
            losses.append(float(per_seq.detach().mean()))
    finally:
        if sampler is not None:
            optimizer.zero_grad(set_to_none=True)
            sampler.close()  # remove the hooks; the model stays usable
    mean_loss = sum(losses) / len(losses) if losses else math.nan
    return LocalTrainingResult(
        steps=plan.steps,
        sample_rate=q,
        noise_multiplier=plan.noise_multiplier,
        mean_loss=mean_loss,
        empty_batches=empty,
        num_records=num_records,
    )
