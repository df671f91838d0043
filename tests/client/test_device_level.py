"""A device under device-level DP: what it records, what it sends beside the masked sum,
and when it declines (``privacy.unit`` "device" and "both")."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from flwr.app import Context, RecordDict

from fedlora import runtime
from fedlora.adapter import LoraSettings, attach_lora, get_adapter_arrays
from fedlora.config import FedloraConfig
from fedlora.errors import BudgetExhaustedError, UpdateError
from fedlora.protocol import NUM_ROUNDS_KEY, ROUND_KEY
from fedlora.server.budget import DECLINE_PATTERN
from fedlora.server.ddp import DeviceLevelDP


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = attach_lora(
            LlamaForCausalLM(config), LoraSettings(r=4, alpha=8, target_modules=("q_proj",)), seed=0
        )
    initial = get_adapter_arrays(model)
    ids = torch.randint(0, 97, (20, 12), generator=torch.Generator().manual_seed(0))
    data = SimpleNamespace(device="d0", train=tuple(f"r{i}" for i in range(20)), heldout=())
    monkeypatch.setattr(runtime, "model_bundle", lambda cfg: SimpleNamespace(model=model))
    monkeypatch.setattr(runtime, "device_info", lambda cfg, i: ("d0", 20))
    monkeypatch.setattr(runtime, "device_data", lambda cfg, i: data)
    monkeypatch.setattr(runtime, "encoded", lambda cfg, name, texts: (ids, torch.ones_like(ids)))

    def make(unit: str, **device_cfg):
        from fedlora.client.device_client import DeviceClient

        cfg = FedloraConfig().replace(
            privacy={"unit": unit, "device": device_cfg, "reproducible_noise": True},
            training={"local_steps": 2, "batch_size": 5, "learning_rate": 0.5},
        )
        ctx = Context(run_id=3, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})  # fmt: skip
        client = DeviceClient(cfg, ctx, device_root=tmp_path / unit)
        ddp = DeviceLevelDP(cfg, [a.shape for a in initial])

        def fit(rnd: int, with_params: bool = True):
            config = {ROUND_KEY: rnd, NUM_ROUNDS_KEY: cfg.training.rounds}
            if with_params:
                config.update(ddp.fit_config(rnd))
            return client.fit([a.copy() for a in initial], config)

        return client, ddp, fit

    return make


def test_unit_device_sends_nothing_its_data_decides_and_records_the_guaranteed_noise(device):
    from fedlora.client.ledger import load_device_ledger

    client, ddp, fit = device("device")
    _, weight, metrics = fit(1)

    assert weight == 1  # every device weighs 1: its record count stays on the device
    assert "num_records" not in client.get_properties({})
    assert metrics["dp"] is False
    assert not {"train_loss", "update_norm", "clipped", "sample_rate"} & set(metrics)
    ledger = load_device_ledger(client.context, client.ledger_path)
    (event,) = ledger.events_for("d0", unit="device")
    assert ledger.events_for("d0") == ()  # no DP-SGD
    assert (event.noise_stddev, event.survivors) == (ddp.params.noise_stddev, 9)
    assert event.l2_sensitivity == ddp.params.l2_sensitivity
    with pytest.raises(BudgetExhaustedError, match="replayed"):
        fit(1)  # the same round again is a replay, whatever the unit


def test_unit_both_trains_with_dp_sgd_and_records_both_events(device):
    from fedlora.client.ledger import load_device_ledger

    client, _, fit = device("both")
    _, weight, metrics = fit(1)

    assert weight == 20 and metrics["dp"] is True and "sample_rate" in metrics
    assert "train_loss" not in metrics and "update_norm" not in metrics
    ledger = load_device_ledger(client.context, client.ledger_path)
    assert len(ledger.events_for("d0", unit="record")) == 1
    assert len(ledger.events_for("d0", unit="device")) == 1


def test_a_request_without_the_noise_parameters_trains_nothing(device):
    _, _, fit = device("device")
    with pytest.raises(UpdateError, match="without the noise parameters"):
        fit(1, with_params=False)


def test_a_device_declines_the_round_past_its_device_budget(device):
    # Calibrated for 1 participation: the device's second round would pass ε.
    _, _, fit = device("device", participations=1)
    fit(1)
    with pytest.raises(BudgetExhaustedError) as err:
        fit(2)
    assert DECLINE_PATTERN.search(str(err.value)) is not None
    assert "device-level ε" in str(err.value)


def test_a_coordinator_that_sends_too_little_noise_gets_a_decline_not_an_update(device):
    # A hostile or misconfigured coordinator shrinks σ a hundredfold in the training
    # request: the device checks the round against its own budget and trains nothing.
    from dataclasses import replace

    from fedlora.client.ledger import load_device_ledger
    from fedlora.ddp.wire import from_fit_config, to_fit_config
    from fedlora.protocol import NUM_ROUNDS_KEY, ROUND_KEY

    client, ddp, _ = device("device")
    params, seed, survivors = from_fit_config(ddp.fit_config(1))
    weak = replace(params, noise_stddev=params.noise_stddev / 100)
    config = {ROUND_KEY: 1, NUM_ROUNDS_KEY: 5, **to_fit_config(weak, seed, survivors)}
    initial = get_adapter_arrays(runtime.model_bundle(client.cfg).model)  # untrained

    with pytest.raises(BudgetExhaustedError) as err:
        client.fit(initial, config)
    assert DECLINE_PATTERN.search(str(err.value)) is not None
    assert load_device_ledger(client.context, client.ledger_path).events_for("d0", unit=None) == ()
