"""Local DP-SGD training of a LoRA adapter on one device's records.

Reads like Opacus' front door: take the LoRA-wrapped model → make it private
(per-sample gradients on the adapter tensors only) → train ``steps`` Poisson
batches → report what was spent. The privacy unit is one record = one
training sequence, so the loss is a per-sequence masked mean summed over the
batch (HF's ``labels=`` loss averages tokens across the batch and couples
samples, which breaks the per-sample sensitivity bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn


@dataclass(frozen=True)
class LocalTrainingPlan:
    """What one device does in one round. ``noise_multiplier`` None means no DP."""

    steps: int
    expected_batch_size: int
    learning_rate: float
    max_grad_norm: float
    noise_multiplier: float | None
    seed: int

    def sample_rate(self, num_records: int) -> float:
        """Poisson sampling rate q = B / N, capped at 1."""
        return min(1.0, self.expected_batch_size / max(1, num_records))


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


def poisson_batches(
    num_records: int, sample_rate: float, steps: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Indices of ``steps`` Poisson-sampled batches: each record joins each batch w.p. q.

    Batches may be empty; that is part of the mechanism the accountant analyses.
    """
    return [
        torch.nonzero(torch.rand(num_records, generator=generator) < sample_rate).flatten()
        for _ in range(steps)
    ]


def train_lora(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    plan: LocalTrainingPlan,
) -> LocalTrainingResult:
    """Train the model's trainable (LoRA) parameters in place for ``plan.steps`` steps.

    With a noise multiplier, every step clips each sequence's gradient to
    ``max_grad_norm`` and adds Gaussian noise of std ``σ·C`` (Opacus
    ``DPOptimizer``); an empty Poisson batch still takes a noise-only step.
    Without one, it is plain SGD on the same batches (for non-private baselines).
    """
    num_records = int(input_ids.shape[0])
    q = plan.sample_rate(num_records)
    generator = torch.Generator().manual_seed(plan.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters: attach a LoRA adapter first")

    dp = plan.noise_multiplier is not None
    base_optimizer = torch.optim.SGD(params, lr=plan.learning_rate)
    net: nn.Module
    optimizer: torch.optim.Optimizer
    if dp:
        net = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        optimizer = DPOptimizer(
            base_optimizer,
            noise_multiplier=float(plan.noise_multiplier),  # type: ignore[arg-type]
            max_grad_norm=plan.max_grad_norm,
            expected_batch_size=max(1, round(q * num_records)),
            # Per-sample grads are exact (GradSampleModule "sum"); "mean" here divides the
            # noisy sum of clipped grads by the *expected* batch size B = q·N, as DP-SGD does.
            loss_reduction="mean",
            generator=torch.Generator().manual_seed(plan.seed + 1),
        )
    else:
        net, optimizer = model, base_optimizer

    net.train()
    losses: list[float] = []
    empty = 0
    try:
        for batch in poisson_batches(num_records, q, plan.steps, generator):
            optimizer.zero_grad(set_to_none=True)
            if batch.numel() == 0:
                empty += 1
                if dp:
                    # Noise-only step: zero per-sample gradients for an empty batch.
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)  # type: ignore[attr-defined]
                    optimizer.step()
                continue
            out = net(
                input_ids=input_ids[batch],
                attention_mask=attention_mask[batch],
                use_cache=False,
            )
            per_seq = per_sequence_loss(out.logits, input_ids[batch], attention_mask[batch])
            loss = per_seq.sum() if dp else per_seq.mean()
            loss.backward()
            optimizer.step()
            losses.append(float(per_seq.detach().mean()))
    finally:
        if dp:
            optimizer.zero_grad(set_to_none=True)
            net._close()  # type: ignore[operator]  # remove Opacus hooks; model stays usable
    mean_loss = sum(losses) / len(losses) if losses else math.nan
    return LocalTrainingResult(
        steps=plan.steps,
        sample_rate=q,
        noise_multiplier=plan.noise_multiplier,
        mean_loss=mean_loss,
        empty_batches=empty,
        num_records=num_records,
    )
