"""Local DP-SGD: the loss, Poisson batches, clipping, noise, and the empty-batch step.

With DP the batches and the noise come from the plan's RandomSource: a fresh OS-seeded
CSPRNG unless a test passes a seeded one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedlora.client.train import (
    InjectedNoiseDPOptimizer,
    LocalTrainingPlan,
    per_sequence_loss,
    poisson_batches,
    train_lora,
)
from fedlora.privacy.noise import SecureRandom, SeededRandom
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


@pytest.mark.parametrize(
    "randomness", [lambda: torch.Generator().manual_seed(0), SecureRandom], ids=["torch", "csprng"]
)
def test_poisson_batches_have_expected_size_and_can_be_empty(randomness):
    batches = poisson_batches(1000, 0.05, 200, randomness())
    sizes = np.array([len(b) for b in batches])
    assert abs(sizes.mean() - 50) < 3
    assert all(b.dtype == torch.int64 and torch.all(b[1:] > b[:-1]) for b in batches)
    tiny = poisson_batches(3, 0.1, 200, randomness())
    assert any(len(b) == 0 for b in tiny) and any(len(b) > 0 for b in tiny)


def test_poisson_batches_from_a_source_are_its_bernoulli_draws():
    got = poisson_batches(50, 0.3, 4, SeededRandom(9))
    src = SeededRandom(9)
    want = [np.flatnonzero(src.bernoulli(0.3, 50)).tolist() for _ in range(4)]
    assert [b.tolist() for b in got] == want


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
    # sample_rate = B/N = 1/4; pick a seeded source whose single Poisson batch is empty
    seed = next(s for s in range(1000) if not SeededRandom(s).bernoulli(0.25, 8).any())
    plan = LocalTrainingPlan(**{**plan.__dict__, "randomness": SeededRandom(seed)})
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


# ------------------------------------------------------------ where the noise comes from
def _plan(sigma: float | None, randomness=None, **kw) -> LocalTrainingPlan:
    base = {
        "steps": 1,
        "expected_batch_size": 8,
        "learning_rate": 0.5,
        "max_grad_norm": 0.7,
        "noise_multiplier": sigma,
        "seed": 0,
        "randomness": randomness,
    }
    return LocalTrainingPlan(**{**base, **kw})


def _train(plan: LocalTrainingPlan, n: int = 8) -> torch.Tensor:
    """The adapter after training a fresh tiny model (same init, same data) with ``plan``."""
    model = tiny_lora_model()
    ids, mask = _data(n=n)
    train_lora(model, ids, mask, plan)
    return torch.cat([p.flatten() for p in _trainable(model)])


def test_the_noise_added_is_the_sources_gaussian_of_std_sigma_c():
    """q = 1 (B = N): every record in the one batch; the σ run minus a σ = 0 run on the same
    batch is −lr·noise/B, and the noise is exactly what the source drew after the batch."""
    sigma, plan = 1.5, _plan(1.5)
    with_noise = _train(_plan(sigma, SeededRandom(21)))
    without = _train(_plan(0.0, SeededRandom(21)))

    src = SeededRandom(21)
    src.bernoulli(1.0, 8)  # the batch
    model = tiny_lora_model()
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    noise = np.concatenate([src.gaussian(k, sigma * plan.max_grad_norm) for k in sizes])
    added = -(with_noise - without).double().numpy() * plan.expected_batch_size / plan.learning_rate
    assert np.allclose(added, noise, rtol=1e-4, atol=1e-5)


def test_secure_noise_has_std_sigma_c_and_mean_zero():
    """Eight one-step runs with OS-seeded sources, each against a σ = 0 run on the same
    (full) batch: 4,096 noise values whose std must be σ·C (standard error 1.1%)."""
    sigma, clip = 2.0, 0.7
    without = _train(_plan(0.0, SeededRandom(0)))  # q = 1: the batch is every record
    added = torch.cat(
        [-(_train(_plan(sigma, SecureRandom())) - without) * 8 / 0.5 for _ in range(8)]
    ).double()
    assert added.numel() == 8 * 512
    assert abs(added.std().item() / (sigma * clip) - 1) < 0.06
    assert abs(added.mean().item()) < 5 * sigma * clip / math.sqrt(added.numel())


def test_two_secure_runs_differ_and_two_seeded_runs_are_identical():
    a, b = _train(_plan(1.0, expected_batch_size=3)), _train(_plan(1.0, expected_batch_size=3))
    assert not torch.equal(a, b)
    assert (a - b).abs().max() > 1e-3  # the noise, not float rounding

    c = _train(_plan(1.0, SeededRandom(4), expected_batch_size=3, steps=3))
    d = _train(_plan(1.0, SeededRandom(4), expected_batch_size=3, steps=3))
    assert torch.equal(c, d)


def test_plain_training_keeps_its_seeded_torch_generator():
    """No DP, no source: batches from torch.Generator(seed), as before; runs are identical."""
    plan = _plan(None, expected_batch_size=3, steps=4, seed=5)
    assert torch.equal(_train(plan), _train(plan))
    model = tiny_lora_model()
    ids, mask = _data(n=8)
    got = train_lora(model, ids, mask, plan)
    batches = poisson_batches(8, 3 / 8, 4, torch.Generator().manual_seed(5))
    assert got.empty_batches == sum(1 for b in batches if b.numel() == 0)
    assert not torch.equal(_train(plan), _train(_plan(None, expected_batch_size=3, steps=4)))


def test_the_optimizer_keeps_opacus_clipping_and_scaling():
    """σ = 0: the injected-noise optimizer steps exactly as Opacus' DPOptimizer; σ > 0: it
    adds the source's draws to the summed clipped gradient before dividing by B."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))

    def grads(make, sigma):
        torch.manual_seed(0)
        net = GradSampleModule(torch.nn.Linear(5, 3), loss_reduction="sum")
        sgd = torch.optim.SGD(net.parameters(), lr=1.0)
        opt = make(sgd, noise_multiplier=sigma, max_grad_norm=0.1, expected_batch_size=4)
        (net(x) ** 2).sum().backward()
        opt.pre_step()
        out = [p.grad.clone() for p in net.parameters()]
        net._close()
        return out

    def injected(seed):
        return lambda sgd, **kw: InjectedNoiseDPOptimizer(sgd, randomness=SeededRandom(seed), **kw)

    opacus = grads(DPOptimizer, 0.0)
    ours = grads(injected(1), 0.0)
    assert all(torch.equal(a, b) for a, b in zip(opacus, ours, strict=True))
    noisy = grads(injected(1), 3.0)
    src = SeededRandom(1)
    for clean, got in zip(opacus, noisy, strict=True):
        noise = torch.from_numpy(src.gaussian(clean.numel(), 0.3)).float().view_as(clean)
        assert torch.allclose(got, clean + noise / 4, atol=1e-6)


# ------------------------------------------------------------ the per-sample gradient path
def test_the_fast_path_gives_opacus_update_to_float_tolerance():
    """The same seeded noise and Poisson batches (some empty, some of several padded
    records), four steps: the adapter trained with LinearGradSampler equals the one trained
    with Opacus' GradSampleModule."""
    from fedlora.client.train import LinearGradSampler, grad_sampler

    plan = _plan(0.8, expected_batch_size=3, steps=4, max_grad_norm=0.05)
    assert isinstance(grad_sampler(tiny_lora_model()), LinearGradSampler)
    ids, mask = _data(n=8)

    adapters, results = [], []
    for mode in ("auto", "opacus"):
        model = tiny_lora_model()
        plan_ = LocalTrainingPlan(**{**plan.__dict__, "randomness": SeededRandom(11)})
        results.append(train_lora(model, ids, mask, plan_, per_sample=mode))
        adapters.append(torch.cat([p.flatten() for p in _trainable(model)]))

    fast, opacus = adapters
    assert results[0].empty_batches == results[1].empty_batches  # the same batches
    assert results[0].mean_loss == pytest.approx(results[1].mean_loss, rel=1e-6)
    assert (fast - tiny_lora_model_adapter()).abs().max() > 1e-3  # it trained
    torch.testing.assert_close(fast, opacus, rtol=1e-5, atol=1e-7)


def tiny_lora_model_adapter() -> torch.Tensor:
    return torch.cat([p.flatten() for p in _trainable(tiny_lora_model())])


def test_a_trainable_tensor_that_is_not_a_linear_weight_falls_back_to_opacus():
    from fedlora.client.train import LinearGradSampler, OpacusGradSampler, grad_sampler

    model = tiny_lora_model()
    model.get_input_embeddings().weight.requires_grad_(True)

    sampler = grad_sampler(model)
    sampler.close()

    assert isinstance(sampler, OpacusGradSampler) and not isinstance(sampler, LinearGradSampler)
    with pytest.raises(ValueError, match="'auto' or 'opacus'"):
        grad_sampler(model, "ghost")  # type: ignore[arg-type]


def test_the_fast_path_leaves_no_hooks_or_per_sample_gradients_behind():
    model = tiny_lora_model()
    ids, mask = _data(n=8)
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())

    train_lora(model, ids, mask, _plan(1.0, SeededRandom(0), expected_batch_size=4, steps=2))

    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


class _Toy(torch.nn.Module):
    """A wide layer fed by the data (not by a narrow layer), then a narrow one, used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = torch.nn.Linear(3, 5, bias=False)
        self.narrow = torch.nn.Linear(5, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.wide(x))
        return self.narrow(h) + self.narrow(h.flip(1))


def test_linear_sampler_is_exact_for_any_bias_free_linear_layers():
    """Per-sample gradients of layers that are not a lora_A/lora_B pair (a wide layer on
    the input, a layer called twice) equal one backward pass per sample."""
    from fedlora.client.train import LinearGradSampler, grad_sampler

    torch.manual_seed(0)
    model, x = _Toy(), torch.randn(4, 6, 3)
    params = list(model.parameters())
    expected = [
        torch.stack(gs)
        for gs in zip(
            *(torch.autograd.grad(model(x[i : i + 1]).pow(2).sum(), params) for i in range(4)),
            strict=True,
        )
    ]

    sampler = grad_sampler(model)
    sampler.backward(sampler(x=x).pow(2).sum())
    sampler.close()

    assert isinstance(sampler, LinearGradSampler)
    for p, want in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad_sample, want, rtol=1e-5, atol=1e-6)  # type: ignore[attr-defined]
