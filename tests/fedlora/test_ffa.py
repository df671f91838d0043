"""FFA-LoRA (``lora.variant: "ffa"``): lora_A frozen from the seed and the module's name,
only lora_B trains and travels, the exported adapter still has both, and the default
variant is what it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.adapter import (
    LoraSettings,
    adapter_names,
    attach_lora,
    ffa_lora_a,
    get_adapter_arrays,
    read_adapter_metadata,
    save_adapter,
    set_adapter_arrays,
)
from fedlora.client.train import LocalTrainingPlan, train_lora
from fedlora.config import FedloraConfig
from fedlora.errors import ConfigError

FFA = LoraSettings(r=4, alpha=8, variant="ffa")


def _base(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def _data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 64, (n, 10), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


def _plan(sigma: float | None = None, steps: int = 3) -> LocalTrainingPlan:
    return LocalTrainingPlan(
        steps=steps, expected_batch_size=4, learning_rate=0.5, max_grad_norm=1.0,
        noise_multiplier=sigma, seed=5,
    )  # fmt: skip


def _lora_a(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}


def test_a_is_the_same_on_every_process_that_has_the_seed_and_depends_on_nothing_else() -> None:
    device = attach_lora(_base(), FFA, seed=7)
    torch.manual_seed(123)  # global RNG state, as another device's process might have
    coordinator = attach_lora(_base(), FFA, seed=7)
    other_run = attach_lora(_base(), FFA, seed=8)

    a_dev, a_coord, a_other = _lora_a(device), _lora_a(coordinator), _lora_a(other_run)

    assert len(a_dev) == 2 * 7 and a_dev.keys() == a_coord.keys()
    for name, a in a_dev.items():
        torch.testing.assert_close(a, a_coord[name], rtol=0, atol=0)
        assert not torch.equal(a, a_other[name])
    name = next(iter(a_dev))
    module = name.removesuffix(".lora_A.default.weight")
    want = ffa_lora_a(7, module, tuple(a_dev[name].shape))
    torch.testing.assert_close(a_dev[name], want, rtol=0, atol=0)
    assert float(want.abs().max()) <= 1 / np.sqrt(32) and float(want.std()) > 0.05


@pytest.mark.parametrize("sigma", [None, 0.5])
def test_only_b_trains_travels_and_a_is_unchanged_by_training(sigma: float | None) -> None:
    model = attach_lora(_base(), FFA, seed=7)
    before = _lora_a(model)
    ids, mask = _data()

    names = adapter_names(model)
    train_lora(model, ids, mask, _plan(sigma))
    arrays = get_adapter_arrays(model)

    assert names and all(".lora_B." in n for n in names) and len(names) == 2 * 7
    assert [a.shape[1] for a in arrays] == [4] * len(arrays)
    assert all(np.abs(a).sum() > 0 for a in arrays)  # B trained from zero
    for name, a in _lora_a(model).items():
        torch.testing.assert_close(a, before[name], rtol=0, atol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == names


def test_the_ffa_mean_of_b_updates_is_the_mean_of_the_devices_delta_w() -> None:
    """Σ n_i (B_i − B_0) A / Σ n_i = (mean B − B_0) A: the aggregate is exact."""
    from fedlora.server.aggregate import weighted_mean

    weights = (30, 50, 20)
    start = attach_lora(_base(), FFA, seed=7)
    b0 = get_adapter_arrays(start)
    a = [t.numpy().astype(np.float64) for t in _lora_a(start).values()]
    updates, delta_w = [], []
    for i, n in enumerate(weights):
        model = attach_lora(_base(), FFA, seed=7)
        ids, mask = _data(8 + 4 * i)
        train_lora(model, ids, mask, _plan(steps=2 + i))
        u = [(b - g).astype(np.float32) for b, g in zip(get_adapter_arrays(model), b0, strict=True)]
        updates.append((u, n))
        delta_w.append([ui.astype(np.float64) @ ai for ui, ai in zip(u, a, strict=True)])

    mean_b = weighted_mean(updates)
    mean_dw = [sum(n * dw[k] for dw, n in zip(delta_w, weights, strict=True)) / sum(weights)
               for k in range(len(a))]  # fmt: skip

    for mb, ai, want in zip(mean_b, a, mean_dw, strict=True):
        np.testing.assert_allclose(mb.astype(np.float64) @ ai, want, rtol=0, atol=1e-9)
        assert float(np.abs(want).max()) > 1e-5  # the devices did move W


def test_a_tier_trains_only_its_first_columns_of_b() -> None:
    model = attach_lora(_base(), FFA, seed=7)
    ids, mask = _data()
    start = [rng_b for rng_b in np.random.default_rng(0).normal(0, 0.1, (14, 1))]
    set_adapter_arrays(
        model, [np.full(a.shape, float(s[0]), np.float32) for a, s in
                zip(get_adapter_arrays(model), start, strict=True)]
    )  # fmt: skip
    before = get_adapter_arrays(model)

    train_lora(model, ids, mask, _plan(0.5), rank=2)
    after = get_adapter_arrays(model)

    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a[:, 2:], b[:, 2:])
        assert np.abs(a[:, :2] - b[:, :2]).min() > 0


def test_the_exported_adapter_has_the_frozen_a_and_the_trained_b(tmp_path: Path) -> None:
    from peft import PeftModel

    model = attach_lora(_base(), FFA, seed=7)
    ids, mask = _data()
    train_lora(model, ids, mask, _plan())
    want = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}

    save_adapter(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(_base(), str(tmp_path / "adapter"))

    got = {n: p for n, p in loaded.named_parameters() if ".lora_" in n}
    assert got.keys() == want.keys() and len(got) == 4 * 7
    for n, p in got.items():
        torch.testing.assert_close(p, want[n], rtol=0, atol=0)
    assert read_adapter_metadata(tmp_path / "adapter")["lora_variant"] == "ffa"


def test_the_default_variant_is_bit_for_bit_what_it_was() -> None:
    """Digest of a seeded plain run's adapter, computed before lora.variant existed."""
    model = attach_lora(_base(), LoraSettings(r=4, alpha=8), seed=3)
    ids, mask = _data()

    train_lora(model, ids, mask, _plan())

    arrays = get_adapter_arrays(model)
    digest = hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()
    assert len(arrays) == 28
    assert digest == "d8040fe4bf425ab2580a08defb7357bbc9f05b19b263a127c2462ecbab3cceb2"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"lora": {"variant": "qlora"}}, "lora variant must be one of lora, ffa, got 'qlora'"),
        (
            {"fleet": {"profiles": [{"name": "p", "share": 1, "lora_rank": 4}]}},
            'fleet.profiles[0].lora_rank needs lora.variant "ffa"',
        ),
        (
            {"lora": {"variant": "ffa", "r": 4},
             "fleet": {"profiles": [{"name": "p", "share": 1, "lora_rank": 8}]}},
            "fleet.profiles[0].lora_rank (8) exceeds lora.r (4)",
        ),
        (
            {"lora": {"variant": "ffa"},
             "fleet": {"profiles": [{"name": "p", "share": 1, "lora_rank": 0}]}},
            "fleet.profiles[0].lora_rank must be a positive integer (or null), got 0",
        ),
    ],
)  # fmt: skip
def test_config_refusals_are_one_line(config: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        FedloraConfig.from_dict(config)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_new_keys_default_to_the_old_meaning() -> None:
    cfg = FedloraConfig.from_dict({"fleet": {"profiles": [{"name": "p", "share": 1}]}})

    assert cfg.lora.variant == "lora" and cfg.fleet.profiles[0].lora_rank is None
    assert FedloraConfig.from_dict(cfg.to_dict()) == cfg
