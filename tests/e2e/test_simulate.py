"""End to end: the Flower simulation engine with real Opacus, peft and SecAgg+.

One small fleet is run twice, with and without SecAgg+, from the same seed and with
``privacy.reproducible_noise`` (research mode: devices seed their DP noise from the
run), so the two runs differ only by SecAgg+'s quantization: the round-1 global
adapters must agree to within it. The other runs here draw noise as a default run
does, from each device's OS CSPRNG, and their reports say so.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.e2e.conftest import ROUNDS, small_config

pytestmark = pytest.mark.slow


def worker_probe(out: Path) -> Any:
    """A client mod that writes, per message, what its worker process was like then."""

    def probe(msg: Any, ctxt: Any, call_next: Any) -> Any:
        from fedlora import runtime
        from fedlora.client import preload
        from fedlora.simulate import WORKER_THREAD_VARS

        seen = {
            "pid": os.getpid(),
            "type": msg.metadata.message_type,
            "env": {k: os.environ.get(k) for k in WORKER_THREAD_VARS},
            "model_built_or_building": bool(runtime._models or runtime._warming),
            "preloading_since_start": preload._thread is not None,
        }
        with out.open("a") as f:
            f.write(json.dumps(seen) + "\n")
        return call_next(msg, ctxt)

    return probe


@pytest.fixture(scope="module")
def runs(tmp_path_factory, plain_run):
    from fedlora import runtime
    from fedlora.simulate import simulate

    run_dir = tmp_path_factory.mktemp("runs") / "secagg"
    cfg = small_config(privacy={"reproducible_noise": True})  # as the plain run
    probe = run_dir.parent / "probe.jsonl"
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "2"  # as the benches set it for their own work
    try:
        summary = simulate(cfg, run_dir, show_progress=False, client_mods=[worker_probe(probe)])
        after = os.environ.get("OMP_NUM_THREADS")
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    runtime.clear()
    seen = [json.loads(line) for line in probe.read_text().splitlines()]
    # The plain run is shared with the resume test (the same small fleet, same seed).
    return {"secagg": (cfg, run_dir, summary), "plain": plain_run, "workers": (seen, after)}


def test_workers_run_one_thread_per_library_and_build_the_model_from_discovery_on(runs):
    """Each worker is one slot of a core, whatever OMP_NUM_THREADS the caller has; it
    started importing the device runtime as Ray started it (Ray's setup hook, before any
    message); the model's build starts with a worker's first message (discovery's), so
    training finds it built or under way; the caller's environment is as it was."""
    seen, after = runs["workers"]

    assert after == "2"
    assert os.environ.get("RAY_RUNTIME_ENV_HOOK") is None
    assert {m["type"] for m in seen} >= {"get_properties", "train"}
    assert all(set(m["env"].values()) == {"1"} for m in seen)
    assert all(m["preloading_since_start"] for m in seen)
    first_train = {}
    for m in seen:
        if m["type"] == "train":
            first_train.setdefault(m["pid"], m)
    assert first_train and all(m["model_built_or_building"] for m in first_train.values())


def test_run_directory_is_complete(runs):
    _cfg, run_dir, summary = runs["secagg"]
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "complete"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["seed"] == 1 and config["training"]["rounds"] == ROUNDS
    assert "versions" in config and config["versions"]["flwr"].startswith("1.39")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    for r in rows:
        assert {"round", "eval_loss", "num_devices", "secagg", "wall_s"} <= set(r)
        assert math.isfinite(r["eval_loss"]) and r["secagg"] is True
    assert all(r["num_devices"] == 4 for r in rows[1:])
    # Each round's SecAgg+ share graph, as sized for its 4 sampled devices (none at round 0).
    from fedlora.server.secagg_graph import DEFAULT_DROPOUT_RATE, share_graph

    graph = share_graph(4, None, None, DEFAULT_DROPOUT_RATE)
    assert all((r["secagg_shares"], r["secagg_threshold"]) == graph for r in rows[1:])
    assert rows[0]["secagg_shares"] is None and rows[0]["secagg_threshold"] is None
    plain = [json.loads(x) for x in (runs["plain"][1] / "metrics.jsonl").read_text().splitlines()]
    assert {r["secagg_shares"] for r in plain} == {None}
    assert summary["eval_loss_final"] == rows[-1]["eval_loss"]
    for i in range(1, ROUNDS + 1):
        assert (run_dir / "checkpoints" / f"round-{i:04d}.safetensors").exists()
    for name in ("report.json", "report.html", "epsilon_by_round.png", "budget_remaining.png"):
        assert (run_dir / "privacy" / name).stat().st_size > 0, name
    # This run seeded its noise (research option): the coordinator's report says so in words.
    report = json.loads((run_dir / "privacy" / "report.json").read_text())
    assert report["noise_source"] == {"source": "seeded-chacha20", "reproducible": True}
    assert "config.json" in report["notes"][0] and summary["privacy"]["reproducible_noise"]


def test_adapter_loads_with_peft_and_matches_the_last_checkpoint(runs):
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file

    from fedlora import runtime
    from fedlora.model import load_base_model

    cfg, run_dir, _ = runs["secagg"]
    base, _tok = load_base_model(runtime.resolve_model_path(cfg))
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    ckpt = load_file(str(run_dir / "checkpoints" / f"round-{ROUNDS:04d}.safetensors"))
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(state) == len(ckpt)
    loaded = torch.cat([v.flatten() for _, v in sorted(state.items())])
    saved = np.concatenate([v.flatten() for _, v in sorted(ckpt.items())])
    assert np.allclose(np.sort(loaded.numpy()), np.sort(saved), atol=1e-7)
    assert float(np.abs(saved).max()) > 0


def test_ledger_and_report_agree_with_an_independent_recount(runs):
    from fedlora.privacy import PrivacyLedger

    cfg, run_dir, summary = runs["secagg"]
    ledger = PrivacyLedger.load(run_dir / "privacy" / "ledger.json")
    report = json.loads((run_dir / "privacy" / "report.json").read_text())
    assert len(ledger.events) == 4 * ROUNDS  # 4 devices per round reported an event
    for ev in ledger.events:
        assert ev.steps == 3 and ev.delta == cfg.privacy.delta and ev.noise_multiplier > 0
    # Independent recount with Opacus' PRV accountant (not the code under test).
    from opacus.accountants import PRVAccountant

    by_device = {d["device"]: d for d in report["devices"]}
    for device in ledger.devices():
        acc = PRVAccountant()
        for ev in ledger.events_for(device):
            acc.history.append((ev.noise_multiplier, ev.sample_rate, ev.steps))
        eps = acc.get_epsilon(delta=cfg.privacy.delta)
        assert by_device[device]["epsilon"] == pytest.approx(eps, rel=0.01)
        assert by_device[device]["epsilon"] <= cfg.privacy.epsilon
    assert summary["privacy"]["max_epsilon"] <= cfg.privacy.epsilon


def test_each_device_ledger_agrees_with_the_coordinator_ledger(runs):
    """Every device kept its own ledger on its 'local disk'; the coordinator's is their union."""
    from fedlora.privacy import PrivacyLedger

    _, run_dir, _ = runs["secagg"]
    coordinator = PrivacyLedger.load(run_dir / "privacy" / "ledger.json")
    device_files = sorted((run_dir / "devices").glob("*/ledger.json"))
    assert {p.parent.name for p in device_files} == set(coordinator.devices())
    for path in device_files:
        own = PrivacyLedger.load(path)
        assert own.devices() == (path.parent.name,)
        assert own.events == coordinator.events_for(path.parent.name)


def test_export_manifest_describes_files_on_disk(runs):
    import hashlib

    _, run_dir, _ = runs["secagg"]
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    names = {a["name"] for a in manifest["artefacts"]}
    assert {"merged-fp32", "int8"} <= names
    for art in manifest["artefacts"]:
        for f in art["files"]:
            data = (run_dir / "export" / f["path"]).read_bytes()
            assert len(data) == f["bytes"]
            assert hashlib.sha256(data).hexdigest() == f["sha256"]
    int8 = next(a for a in manifest["artefacts"] if a["name"] == "int8")
    assert int8["quality"]["kl"] <= 1e-3 and int8["quality"]["top1_agreement"] >= 0.98


def test_secagg_aggregate_matches_plain_aggregation(runs):
    """Same seed, same devices, same (seeded) noise: SecAgg+ only adds quantization error."""
    from safetensors.numpy import load_file

    _, secagg_dir, _ = runs["secagg"]
    _, plain_dir, _ = runs["plain"]
    a = load_file(str(secagg_dir / "checkpoints" / "round-0001.safetensors"))
    b = load_file(str(plain_dir / "checkpoints" / "round-0001.safetensors"))
    assert a.keys() == b.keys()
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    moved = max(float(np.abs(b[k]).max()) for k in b if "lora_B" in k)  # B starts at 0
    # SecAgg+ scales each update by n_i / max_weight, quantizes it (one step of
    # 2·clipping_range / (quantization_range − 1) at most) and divides the sum by
    # Σ n_i / max_weight: the mean is off by at most k · step · max_weight / Σ n_i
    # ≤ step · max_n / min_n for any k sampled devices.
    from fedlora import runtime

    cfg = small_config()
    s = cfg.secagg
    step = 2 * s.clipping_range / (s.quantization_range - 1)
    sizes = [len(d.train) for d in runtime.fleet(cfg).devices]
    tol = 2 * step * max(sizes) / min(sizes) + 1e-6
    assert diff < tol, (diff, tol)
    assert moved > 100 * diff  # the comparison is not vacuous: the adapter moved


def test_devices_stop_being_sampled_exactly_when_their_budget_would_be_exceeded(tmp_path):
    """Fixed σ and a small budget: the coordinator stops sampling each device at the round
    its next step would exceed its budget, computed here independently of the run."""
    from fedlora import runtime
    from fedlora.privacy import DPSGDEvent, PrivacyLedger, epsilon_for
    from fedlora.simulate import simulate

    rounds, steps, batch, sigma, delta = 5, 3, 8, 1.0, 1e-5
    base = small_config(
        fleet={"num_devices": 5, "devices_per_round": 5, "min_devices": 3},
        training={"rounds": rounds, "local_steps": steps, "batch_size": batch},
        export={"enabled": False},
    )
    fleet = runtime.fleet(base)
    rates = {d.device: min(1.0, batch / len(d.train)) for d in fleet.devices}

    def eps(device: str, n: int) -> float:
        evs = [
            DPSGDEvent(
                device=device,
                round=r,
                noise_multiplier=sigma,
                sample_rate=rates[device],
                steps=steps,
                delta=delta,
            )
            for r in range(1, n + 1)
        ]
        return epsilon_for(evs, delta, "prv") if evs else 0.0

    median = sorted(rates, key=rates.get)[len(rates) // 2]
    budget = eps(median, 2) * 1.001  # the median device affords exactly 2 rounds
    affordable = {d: max(n for n in range(rounds + 1) if eps(d, n) <= budget) for d in rates}
    expected_counts = dict.fromkeys(rates, 0)
    expected_skips = []
    for r in range(1, rounds + 1):
        eligible = [d for d in rates if expected_counts[d] < affordable[d]]
        if len(eligible) < 3:
            expected_skips.append(r)
            continue
        for d in eligible:
            expected_counts[d] += 1

    cfg = base.replace(privacy={"epsilon": budget, "noise_multiplier": sigma, "delta": delta})
    simulate(cfg, tmp_path / "run", show_progress=False)

    ledger = PrivacyLedger.load(tmp_path / "run" / "privacy" / "ledger.json")
    assert {d: len(ledger.events_for(d)) for d in rates} == expected_counts
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if "skipped" in r] == expected_skips
    assert expected_skips, "the budget must run out within the run for this test to mean anything"
    assert all(r["failures"] == 0 for r in rows)  # no device had to decline: none was asked
    report = json.loads((tmp_path / "run" / "privacy" / "report.json").read_text())
    for dev in report["devices"]:
        assert dev["epsilon"] <= budget
    # Fixed σ: a device is exhausted when one more round would exceed its budget. The report
    # reads the ledger, so it judges devices that trained (the next round is like their last).
    exhausted = {d for d in rates if 0 < expected_counts[d] == affordable[d]}
    assert {d["device"] for d in report["devices"] if d["exhausted"]} == exhausted
    assert report["fleet"]["num_exhausted"] == len(exhausted)
    # A default run's noise came from each device's CSPRNG: the coordinator's report and
    # `fedlora report` both say so.
    from fedlora.reporting.rundir import load_run, report_for

    again = report_for(load_run(tmp_path / "run"))
    for r in (report, again):
        assert r["noise_source"] == {"source": "os-csprng-chacha20", "reproducible": False}
        assert not any("reproducible" in n for n in r["notes"])


def test_a_users_own_checkpoint_via_model_path(tmp_path):
    """``--model PATH``: a LLaMA-family checkpoint of another size with its own tokenizer,
    saved by this test and loaded through the real ``from_pretrained`` path, end to end."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedlora import runtime
    from fedlora.data.synthetic import default_records
    from fedlora.model import train_tokenizer
    from fedlora.simulate import simulate

    texts = [r.text for r in default_records(4, seed=9, split="public")]
    tokenizer = train_tokenizer(texts, vocab_size=400, max_length=128)
    torch.manual_seed(3)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, intermediate_size=96, max_position_embeddings=128,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    user_model = tmp_path / "my-llama"
    model.save_pretrained(user_model)
    tokenizer.save_pretrained(user_model)

    cfg = small_config(
        model={"path": str(user_model)},
        fleet={"num_devices": 4, "devices_per_round": 3, "min_devices": 3},
        training={"rounds": 1, "local_steps": 2},
        lora={"r": 2, "target_modules": ["q_proj", "v_proj"]},
        # Seeded noise: int8's top-1 gate on this random 1-layer model moves with the noise
        # draw (0.974 < 0.98 once with OS noise); the test is about --model PATH, not the gate.
        privacy={"reproducible_noise": True},
    )
    summary = simulate(cfg, tmp_path / "run", show_progress=False)
    runtime.clear()

    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["resolved"]["model_path"] == str(user_model)
    adapter_cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 2 and set(adapter_cfg["target_modules"]) == {"q_proj", "v_proj"}
    assert math.isfinite(summary["eval_loss_final"])
    manifest = json.loads((tmp_path / "run" / "export" / "manifest.json").read_text())
    merged = json.loads((tmp_path / "run" / "export" / "merged" / "config.json").read_text())
    assert merged["hidden_size"] == 48 and merged["vocab_size"] == len(tokenizer)
    assert any(a["name"] == "int8" for a in manifest["artefacts"])


def test_devices_train_with_the_sigma_their_own_search_finds_prefetched_or_not(tmp_path):
    """A calibrated run with the prefetch: each (round, device) the coordinator sampled is
    the forecast's, and its σ is exactly what the device's own search returns for the
    history it had (replayed here, every cache empty, no shared answers)."""
    from fedlora import runtime
    from fedlora.client.device_client import plan_noise
    from fedlora.privacy import PrivacyLedger
    from fedlora.privacy import calibrate as cal
    from fedlora.simprefetch import forecast_calibrations
    from fedlora.simulate import simulate

    cfg = small_config(
        training={"rounds": 3, "local_steps": 2, "batch_size": 8},
        privacy={"noise_multiplier": None, "epsilon": 4.0},
        export={"enabled": False},
    )
    simulate(cfg, tmp_path / "run", show_progress=False)
    runtime.clear()

    ledger = PrivacyLedger.load(tmp_path / "run" / "privacy" / "ledger.json")
    forecast = [(c.server_round, c.device, c.sample_rate) for c in forecast_calibrations(cfg)]
    trained = [(e.round, e.device, e.sample_rate) for e in ledger.events]
    assert sorted(trained) == sorted(forecast) and len(trained) == 4 * 3
    cal._calibrate.cache_clear()
    replay = PrivacyLedger()
    for event in sorted(ledger.events, key=lambda e: (e.round, e.device)):
        own = plan_noise(cfg, replay, event.device, event.round, 3, event.sample_rate)
        assert own == event.noise_multiplier
        replay.append(event)
