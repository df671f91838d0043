"""Local DP-SGD: the loss, Poisson batches, clipping, noise, and the empty-batch step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from client.train import LocalTrainingPlan, per_sequence_loss, poisson_batches, train_lora
from tests.conftest import tiny_lora_model


def _data(n: int = 12, t: int = 10, vocab: int = 97, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, 6:] = 0  # half the sequences are padded
    return ids, mask


def _trainable(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def test_per_sequence_loss_matches_manual_masked_mean():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4], [0, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    got = per_sequence_loss(logits, ids, mask)
    lp = torch.log_softmax(logits, dim=-1)
    first = -(lp[0, 0, 2] + lp[0, 1, 3] + lp[0, 2, 4]) / 3
    second = -lp[1, 0, 1]  # one real target token; padded targets ignored
    assert torch.allclose(got, torch.stack([first, second]), atol=1e-6)


def test_per_sequence_loss_does_not_couple_sequences():
    """Changing one sequence leaves every other sequence's loss unchanged (unlike labels=)."""
    model = tiny_lora_model()
    ids, mask = _data()
    with torch.no_grad():
        a = per_sequence_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
        ids2 = ids.clone()
        ids2[3] = (ids2[3] + 1) % 97
        b = per_sequence_loss(model(input_ids=ids2, attention_mask=mask).logits, ids2, mask)
    changed = (a - b).abs() > 1e-7
    assert changed.tolist() == [i == 3 for i in range(len(a))]


def test_poisson_batches_have_expected_size_and_can_be_empty():
    g = torch.Generator().manual_seed(0)
    batches = poisson_batches(1000, 0.05, 200, g)
    sizes = np.array([len(b) for b in batches])
    assert abs(sizes.mean() - 50) < 3
    g = torch.Generator().manual_seed(0)
    tiny = poisson_batches(3, 0.1, 200, g)
    assert any(len(b) == 0 for b in tiny) and any(len(b) > 0 for b in tiny)


def test_empty_batch_takes_a_noise_only_step_of_the_right_scale():
    """All batches empty: the update is pure Gaussian noise of std lr·σ·C/B."""
    model = tiny_lora_model()
    ids, mask = _data(n=8)
    before = _trainable(model)
    lr, sigma, clip, batch = 0.1, 2.0, 0.5, 2
    plan = LocalTrainingPlan(
        steps=1,
        expected_batch_size=batch,
        learning_rate=lr,
        max_grad_norm=clip,
        noise_multiplier=sigma,
        seed=3,
    )
    # sample_rate = B/N = 1/4; pick a seed whose single Poisson batch is empty
    for seed in range(1000):
        g = torch.Generator().manual_seed(seed)
        if len(poisson_batches(8, 0.25, 1, g)[0]) == 0:
            break
    plan = LocalTrainingPlan(**{**plan.__dict__, "seed": seed})
    result = train_lora(model, ids, mask, plan)
    assert result.empty_batches == 1 and math.isnan(result.mean_loss)
    delta = torch.cat([(a - b).flatten() for a, b in zip(_trainable(model), before, strict=True)])
    assert delta.abs().max() > 0, "an empty batch must still add noise"
    expected_std = lr * sigma * clip / batch
    assert abs(delta.std().item() / expected_std - 1) < 0.1


def test_per_sample_clipping_bounds_the_update():
    """σ≈0: one step moves the adapter by at most lr·C (Σ clipped grads / B, with B = q·N)."""
    model = tiny_lora_model()
    ids, mask = _data(n=8)
    before = _trainable(model)
    lr, clip = 1.0, 1e-3
    plan = LocalTrainingPlan(
        steps=1,
        expected_batch_size=8,
        learning_rate=lr,
        max_grad_norm=clip,
        noise_multiplier=1e-9,
        seed=0,
    )
    train_lora(model, ids, mask, plan)  # q = 1: every record in the batch
    delta = torch.cat([(a - b).flatten() for a, b in zip(_trainable(model), before, strict=True)])
    assert 0 < delta.norm().item() <= lr * clip * (1 + 1e-3)


def test_training_reduces_loss_and_model_is_reusable_across_rounds():
    model = tiny_lora_model()
    ids, mask = _data(n=16)
    ids[:] = ids[0]  # one repeated sequence: easy to fit
    plan = LocalTrainingPlan(
        steps=10,
        expected_batch_size=8,
        learning_rate=1.0,
        max_grad_norm=10.0,
        noise_multiplier=0.01,
        seed=0,
    )
    r1 = train_lora(model, ids, mask, plan)
    r2 = train_lora(model, ids, mask, plan)  # second round on the same replica
    assert r2.mean_loss < r1.mean_loss
    assert not any(
        hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters()
    )


def test_only_lora_parameters_change():
    model = tiny_lora_model()
    ids, mask = _data()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    plan = LocalTrainingPlan(
        steps=2,
        expected_batch_size=4,
        learning_rate=0.1,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        seed=0,
    )
    train_lora(model, ids, mask, plan)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_model_without_trainable_parameters_is_refused():
    model = tiny_lora_model()
    for p in model.parameters():
        p.requires_grad_(False)
    ids, mask = _data()
    plan = LocalTrainingPlan(
        steps=1,
        expected_batch_size=4,
        learning_rate=0.1,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        seed=0,
    )
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_lora(model, ids, mask, plan)
