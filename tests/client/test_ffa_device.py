"""A simulated device of a lower tier (FFA-LoRA's nested ranks) trains and sends only its
columns of lora_B, and says which rank it trained; a full-rank device sends every column."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from fedlora import runtime
from fedlora.adapter import LoraSettings, attach_lora, get_adapter_arrays
from fedlora.config import FedloraConfig
from fedlora.protocol import NUM_ROUNDS_KEY, ROUND_KEY


def _tiny_ffa_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = LlamaForCausalLM(config)
    settings = LoraSettings(r=4, alpha=8, variant="ffa", target_modules=("q_proj", "v_proj"))
    return attach_lora(base, settings, seed=0)


@pytest.mark.parametrize(("tier", "nonzero"), [(2, 2), (None, 4)])
def test_a_device_sends_only_its_tiers_columns_and_says_its_rank(
    monkeypatch: pytest.MonkeyPatch, tier: int | None, nonzero: int
) -> None:
    from fedlora.client.device_client import DeviceClient

    model = _tiny_ffa_model()
    initial = get_adapter_arrays(model)
    ids = torch.randint(0, 97, (20, 12), generator=torch.Generator().manual_seed(0))
    device = SimpleNamespace(device="d0", train=tuple(f"r{i}" for i in range(20)), heldout=())
    monkeypatch.setattr(runtime, "model_bundle", lambda cfg: SimpleNamespace(model=model))
    monkeypatch.setattr(runtime, "device_info", lambda cfg, i: ("d0", 20))
    monkeypatch.setattr(runtime, "device_data", lambda cfg, i: device)
    monkeypatch.setattr(runtime, "encoded", lambda cfg, name, texts: (ids, torch.ones_like(ids)))
    cfg = FedloraConfig().replace(
        lora={"variant": "ffa", "r": 4},
        fleet={"profiles": [{"name": "phone", "share": 1.0, "lora_rank": tier}]},
        privacy={"noise_multiplier": 1.0},
        training={"local_steps": 3, "batch_size": 5, "learning_rate": 0.5},
    )
    ctx = Context(run_id=3, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config={})  # fmt: skip

    update, n, metrics = DeviceClient(cfg, ctx).fit(
        [a.copy() for a in initial], {ROUND_KEY: 1, NUM_ROUNDS_KEY: 5}
    )

    assert n == 20 and metrics["lora_rank"] == (tier or 4)
    assert len(update) == 2 and all(u.shape[1] == 4 for u in update)  # two lora_B, no A
    for u in update:
        assert not np.any(u[:, nonzero:])
        assert np.all(np.abs(u[:, :nonzero]).sum(axis=0) > 0)
