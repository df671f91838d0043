"""Where a device's DP noise comes from: its own CSPRNG, never the run config.

A deployed device (node config with ``data-path``) draws noise and Poisson batches
from an OS-seeded CSPRNG each round and refuses a run that asks for reproducible
noise; a simulated one (``partition-id``) may seed them from the run for research.
Real Opacus DP-SGD on a 1-layer LLaMA with LoRA; the data file is read for real,
only the model bundle and tokenization are stand-ins.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from fedlora import runtime
from fedlora.client.device_client import DeviceClient
from fedlora.client.ledger import load_device_ledger
from fedlora.config import FedloraConfig
from fedlora.errors import PrivacyError
from fedlora.privacy import PrivacyLedger
from fedlora.protocol import NUM_ROUNDS_KEY, ROUND_KEY
from tests.conftest import tiny_lora_model

DEVICE = "phone-7"
VOCAB = 97


def _encode(texts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of each text, mod the tiny vocabulary, padded to 12 tokens."""
    ids = torch.zeros((len(texts), 12), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, text in enumerate(texts):
        codes = [b % VOCAB for b in text.encode()][:12]
        ids[i, : len(codes)] = torch.tensor(codes)
        mask[i, : len(codes)] = 1
    return ids, mask


@pytest.fixture
def world(monkeypatch, tmp_path):
    """A device's data file on disk, a tiny model, and a way to start a device and fit."""
    model = tiny_lora_model(seed=0)
    initial = [p.detach().numpy().copy() for n, p in model.named_parameters() if "lora_" in n]
    data = tmp_path / "records.jsonl"
    with data.open("w") as fh:
        for i in range(30):
            fh.write(json.dumps({"device": DEVICE, "text": f"record {i}: " + "ab" * (i % 5)}))
            fh.write("\n")
    monkeypatch.setattr(runtime, "model_bundle", lambda cfg: SimpleNamespace(model=model))
    monkeypatch.setattr(runtime, "encoded", lambda cfg, name, texts: _encode(texts))
    sim = SimpleNamespace(device="device-0000", train=tuple(f"r{i}" for i in range(27)))
    monkeypatch.setattr(runtime, "device_info", lambda cfg, i: (sim.device, len(sim.train)))
    monkeypatch.setattr(runtime, "device_data", lambda cfg, i: sim)

    def device(cfg: FedloraConfig, name: str, deployed: bool = True) -> DeviceClient:
        node: dict = {"partition-id": 0}
        if deployed:
            ledger = tmp_path / name / "ledger.json"
            node = {"data-path": str(data), "device-id": DEVICE, "ledger-path": str(ledger)}
        ctx = Context(run_id=5, node_id=1, node_config=node, state=RecordDict(), run_config={})
        return DeviceClient(cfg, ctx)

    def fit(client: DeviceClient, rnd: int = 1):
        from fedlora.adapter import set_adapter_arrays

        set_adapter_arrays(model, initial)
        params = [a.copy() for a in initial]
        return client.fit(params, {ROUND_KEY: rnd, NUM_ROUNDS_KEY: 3})

    return SimpleNamespace(device=device, fit=fit, data=data)


def _config(**privacy) -> FedloraConfig:
    return FedloraConfig().replace(
        privacy={"noise_multiplier": 1.0, **privacy},
        training={"local_steps": 3, "batch_size": 6, "learning_rate": 0.5},
    )


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def test_two_deployed_devices_started_with_the_same_run_config_and_data_draw_different_noise(
    world,
):
    cfg = _config()
    first, n1, m1 = world.fit(world.device(cfg, "a"))
    second, n2, m2 = world.fit(world.device(cfg, "b"))

    # Same device, run, round, σ, q and steps: everything the coordinator knows is equal ...
    same = ("device", "round", "run", "steps", "sample_rate", "noise_multiplier", "dp")
    assert n1 == n2 == 27 and all(m1[k] == m2[k] for k in same) and m1["device"] == DEVICE
    # ... and the updates differ by DP noise: lr·σ·C/B = 0.083 per step and value.
    assert _max_diff(first, second) > 0.05


def test_a_deployed_device_refuses_reproducible_noise_in_one_line(world):
    client = world.device(_config(reproducible_noise=True), "a")

    with pytest.raises(PrivacyError) as info:
        world.fit(client, rnd=2)

    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"device {DEVICE} refuses round 2: ")
    assert "privacy.reproducible_noise" in msg and "OS CSPRNG" in msg
    assert "declines" not in msg  # a refusal of the run, not a spent budget
    assert len(load_device_ledger(client.context, client.ledger_path)) == 0  # nothing spent


def test_a_deployed_device_refuses_it_even_without_dp(world):
    client = world.device(_config(reproducible_noise=True, enabled=False), "a")

    with pytest.raises(PrivacyError, match="refuses round 1"):
        world.fit(client)


def test_a_simulated_device_accepts_reproducible_noise_and_reproduces(world):
    cfg = _config(reproducible_noise=True)
    first, _, m1 = world.fit(world.device(cfg, "a", deployed=False))
    second, _, _ = world.fit(world.device(cfg, "b", deployed=False))
    third, _, _ = world.fit(world.device(cfg, "c", deployed=False), rnd=2)

    assert m1["dp"] and m1["noise_multiplier"] == 1.0
    assert _max_diff(first, second) == 0.0  # bit for bit
    assert _max_diff(first, third) > 0.05  # another round, other noise


def test_a_simulated_device_draws_secure_noise_by_default(world):
    cfg = _config()
    first, _, _ = world.fit(world.device(cfg, "a", deployed=False))
    second, _, _ = world.fit(world.device(cfg, "b", deployed=False))

    assert _max_diff(first, second) > 0.05


def test_nothing_the_device_keeps_or_sends_carries_its_key(world, monkeypatch):
    """The OS bytes that key the round's CSPRNG appear in neither the ledger nor the reply."""
    drawn: list[bytes] = []
    real = os.urandom

    def recording(n: int) -> bytes:
        out = real(n)
        drawn.append(out)
        return out

    monkeypatch.setattr(os, "urandom", recording)
    client = world.device(_config(), "a")
    update, _, metrics = world.fit(client)

    key, nonce = drawn[0], drawn[1]
    assert (len(key), len(nonce)) == (32, 16)
    ledger_text = client.ledger_path.read_text()
    reply_text = json.dumps(metrics, default=str) + repr(update)
    for secret in (key, nonce):
        for form in (secret.hex(), secret.hex().upper(), str(list(secret))):
            assert form not in ledger_text and form not in reply_text
    (event,) = PrivacyLedger.load(client.ledger_path).events
    assert set(json.loads(ledger_text)["events"][0]) == {
        "device",
        "round",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "delta",
        "mechanism",
        "run",
    }
    assert event.device == DEVICE
    assert not {k for k in metrics if "seed" in k or "key" in k or "nonce" in k}


def _plant(directory, cfg: FedloraConfig, q: float, factor: float) -> None:
    """File σ·factor as the answer to the round-1 calibration of a device with rate q."""
    from fedlora.privacy import calibrate_noise_multiplier
    from fedlora.privacy.calibration_cache import SharedCalibrations

    for path in directory.glob("*.json"):
        path.unlink()
    args = (cfg.privacy.epsilon, cfg.privacy.delta, q, cfg.training.local_steps, 3)
    true = calibrate_noise_multiplier(*args, shared=SharedCalibrations(directory))
    (path,) = directory.glob("*.json")  # the one question just filed
    entry = json.loads(path.read_text())
    path.write_text(json.dumps({**entry, "sigma": true * factor}))


def test_a_simulated_device_takes_its_simulations_filed_sigma_a_deployed_one_never(
    world, tmp_path, monkeypatch
):
    """The prefetch's answers are read by simulated devices only (the directory is the
    simulation's own); a deployed device searches for itself whatever the environment."""
    from fedlora.privacy import calibrate as cal
    from fedlora.privacy.calibration_cache import ENV

    cfg = _config(noise_multiplier=None)
    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.delenv(ENV, raising=False)
    _, _, sim_own = world.fit(world.device(cfg, "s0", deployed=False))
    _, _, dep_own = world.fit(world.device(cfg, "d0"))
    monkeypatch.setenv(ENV, str(shared))

    _plant(shared, cfg, sim_own["sample_rate"], factor=1.5)
    cal._calibrate.cache_clear()
    _, _, simulated = world.fit(world.device(cfg, "s1", deployed=False))
    _plant(shared, cfg, dep_own["sample_rate"], factor=1.5)
    cal._calibrate.cache_clear()
    _, _, deployed = world.fit(world.device(cfg, "d1"))

    assert simulated["noise_multiplier"] == sim_own["noise_multiplier"] * 1.5
    assert deployed["noise_multiplier"] == dep_own["noise_multiplier"]
