"""End to end as an operator deploys it: separate processes on 127.0.0.1, gRPC + TLS.

One coordinator (``fedlora coordinator``: a supervised SuperLink and fedlora's
services) and three devices (``fedlora device``: a supervised SuperNode each,
its own data file, key and ledger on "local disk") are started as real
processes with real keys from ``fedlora keys``; the coordinator listens on
every interface (``--host 0.0.0.0``), as one reached from other machines does.
Then, in order:

0. an attacker holding only the CA certificate submits bundles with code
   straight to the Control API and through the RunService: nothing of them runs
   on the coordinator or any device;
1. the operator's ``fedlora run`` does a SecAgg+ run. Each device drew its DP
   noise from its own CSPRNG, so nobody can recompute its update; instead the
   test checks that the aggregate carries exactly the noise DP-SGD promises (on
   the lora_A tensors, which get no gradient in round 1: the weighted mean of the
   devices' noise, std from the σ, q and steps in their own ledgers) and that the
   run's seed does not predict it (the update a device would have made with noise
   seeded from the run is uncorrelated with it);
2. a device downloads the released int8 model through ModelService, and a
   tampered partial download is caught and not installed;
3. a device with an unregistered key is refused with a clear message;
4. the coordinator is SIGKILLed between rounds of a second run and restarted on
   the same DIR: the run history and every ledger are intact, the devices
   reconnect (all three online again) with their ledgers intact.

Every process the test starts is stopped by it; the last check looks for
orphans.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from fedlora.testing.deployment import LocalDeployment

pytestmark = pytest.mark.slow

DEVICES = 3


def _config(rounds: int, export: bool) -> dict:
    return {
        "fleet": {"num_devices": DEVICES, "devices_per_round": DEVICES, "min_devices": DEVICES},
        "training": {"rounds": rounds, "local_steps": 2, "batch_size": 8},
        "export": {"enabled": export, "formats": ["int8"]},
        "secagg": {"timeout_s": 120.0},
        "seed": 3,
    }


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    dep = LocalDeployment(root, num_devices=DEVICES)
    dep.host = "0.0.0.0"
    dep.prepare(extra_keys=("rogue",))
    try:
        dep.start()
        yield dep
    finally:
        dep.stop()
        deadline = time.monotonic() + 15  # apps notice their supervisor is gone within 1 s
        while dep.orphans() and time.monotonic() < deadline:
            time.sleep(0.5)
        leftovers = dep.orphans()
        for line in leftovers:  # never leave them running, even when the check fails
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
        assert not leftovers, f"orphaned processes: {leftovers}"


@pytest.fixture(scope="module")
def first_run(deployment):
    """The operator's first run (1 round, SecAgg+, int8 export), once for the module: what
    ``fedlora run`` printed. Any test that needs it asks for it, so each stands alone."""
    res = deployment.run("first", _config(1, export=True))
    assert res.returncode == 0, (
        res.stdout[-3000:] + res.stderr[-3000:] + deployment.log("coordinator")
    )
    return res


def _device_ledger(dep: LocalDeployment, i: int):
    from fedlora.privacy import PrivacyLedger

    return PrivacyLedger.load(dep.state(i) / "ledger.json")


def _seed_predicted_round(
    dep: LocalDeployment, run_dir: Path, rnd: int, previous: list[np.ndarray]
) -> tuple[list[np.ndarray], list[int], list[float]]:
    """What someone holding config.json would compute for global_{rnd}: previous + the
    weighted mean of every device's update retrained with noise and batches seeded from
    the run (as ``privacy.reproducible_noise`` would seed them); with the weights and,
    per device, the std its DP noise adds to each value of its update."""
    import math

    import torch

    from fedlora import runtime
    from fedlora.adapter import get_adapter_arrays, set_adapter_arrays
    from fedlora.client.device_client import _device_index, _seed
    from fedlora.client.train import LocalTrainingPlan, train_lora
    from fedlora.config import FedloraConfig
    from fedlora.data.fleet import local_device_data
    from fedlora.data.tokenize import encode_texts
    from fedlora.privacy import SeededRandom

    cfg = FedloraConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    run_id = str(json.loads((run_dir / "run.json").read_text())["flower_run_id"])
    bundle = runtime.model_bundle(cfg)
    torch.set_num_threads(1)
    updates, weights, noise_std = [], [], []
    for i in range(DEVICES):
        device = f"device-{i}"
        (event,) = [
            e
            for e in _device_ledger(dep, i).events_for(device)
            if e.run == run_id and e.round == rnd
        ]
        data = local_device_data(
            dep.data / f"{device}.jsonl",
            device,
            heldout_fraction=cfg.data.heldout_fraction,
            seed=cfg.seed,
        )
        ids, mask = encode_texts(bundle.tokenizer, list(data.train), cfg.data.seq_len)
        seed = _seed(cfg.seed, _device_index(device), rnd)
        plan = LocalTrainingPlan(
            steps=cfg.training.local_steps,
            expected_batch_size=cfg.training.batch_size,
            learning_rate=cfg.learning_rate,
            max_grad_norm=cfg.privacy.max_grad_norm,
            noise_multiplier=event.noise_multiplier,
            seed=seed,
            randomness=SeededRandom(seed),
        )
        n = int(ids.shape[0])
        assert plan.sample_rate(n) == pytest.approx(event.sample_rate)
        set_adapter_arrays(bundle.model, previous)
        train_lora(bundle.model, ids, mask, plan)
        local = get_adapter_arrays(bundle.model)
        updates.append([lo - gl for lo, gl in zip(local, previous, strict=True)])
        weights.append(n)
        # Each step adds N(0, (σ·C)²) to the summed gradient, then divides by B = q·N.
        b = max(1, round(event.sample_rate * n))
        per_step = plan.learning_rate * event.noise_multiplier * plan.max_grad_norm / b
        noise_std.append(per_step * math.sqrt(event.steps))
    total = float(sum(weights))
    mean = [
        sum(w * u[k] for w, u in zip(weights, updates, strict=True)) / total
        for k in range(len(previous))
    ]
    return [p + m for p, m in zip(previous, mean, strict=True)], weights, noise_std


def _wait_finished(dep: LocalDeployment, run_id: int, timeout_s: float = 120) -> object:
    from flwr.proto.control_pb2 import ListRunsRequest

    from fedlora.server.control import control_client

    deadline = time.monotonic() + timeout_s
    while True:
        with control_client(f"127.0.0.1:{dep.port + 1}", dep.ca, insecure=False) as client:
            run = client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id]
        if run.status.status == "finished" or time.monotonic() > deadline:
            return run.status
        time.sleep(0.5)


def test_an_attacker_with_only_the_ca_runs_no_code_anywhere(deployment, tmp_path):
    import grpc

    from fedlora.auditlog import read_events
    from fedlora.cli.run import RunServiceClient
    from fedlora.testing.attacker import evil_fab, markers, submit_to_control_api
    from fedlora.testing.deployment import EVERY_INTERFACE, listening_tcp
    from fedlora.v1 import run_service_pb2 as pb
    from fedlora.v1 import run_service_pb2_grpc

    dep = deployment
    audit_before = read_events(dep.dir)
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    # The Control API (P+1) listens on loopback only, though the coordinator serves the
    # Fleet API (P) and its own services (P+2) on every interface.
    listening = listening_tcp()
    for port in (dep.port, dep.port + 2):
        assert {ip for ip, p in listening if p == port} & EVERY_INTERFACE, (port, listening)
    assert {ip for ip, p in listening if p == dep.port + 1} == {"127.0.0.1"}

    # Straight to the Control API, from the coordinator's own loopback (more than a network
    # attacker can reach): Flower accepts the run, fedlora's executor refuses its ServerApp.
    for shadow in (False, True):
        fab = evil_fab(marker_dir, shadow=shadow, reply_timeout_s=20)
        run_id = submit_to_control_api(f"127.0.0.1:{dep.port + 1}", fab, dep.ca)
        status = _wait_finished(dep, run_id)
        assert (status.status, status.sub_status) == ("finished", "failed"), status
        assert "app bundle" in status.details, status.details

    # Through the RunService (which takes a config, never a bundle) without the operator key.
    channel = grpc.secure_channel(
        f"127.0.0.1:{dep.port + 2}", grpc.ssl_channel_credentials(dep.ca.read_bytes())
    )
    with pytest.raises(grpc.RpcError) as unsigned:
        run_service_pb2_grpc.RunServiceStub(channel).StartRun(
            pb.StartRunRequest(name="evil", config_json="{}"), timeout=20
        )
    assert unsigned.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()
    from fedlora.config import FedloraConfig
    from fedlora.errors import FedloraError

    forged = RunServiceClient(f"127.0.0.1:{dep.port + 2}", dep.ca, dep.keys / "rogue.key")
    with forged, pytest.raises(FedloraError, match="signature"):
        forged.start("evil", FedloraConfig())
    device = RunServiceClient(
        f"127.0.0.1:{dep.port + 2}", dep.ca, dep.keys / "device-0.key", caller="device-0"
    )
    with device, pytest.raises(FedloraError, match="operator key"):
        device.start("evil", FedloraConfig())

    # Nothing of either bundle was imported anywhere; the coordinator said why, once each.
    assert markers(marker_dir) == []
    log = (dep.dir / "logs" / "serverapp.log").read_text(errors="replace")
    assert log.count("refused the run's app bundle") == 2, log[-3000:]  # this test's two
    assert not (dep.dir / "runs" / "evil").exists()
    for i in range(DEVICES):  # no device was ever asked to run anything
        app_log = dep.state(i) / "clientapp.log"
        assert not app_log.exists() or "refused" not in app_log.read_text(errors="replace")
    # Only the operator's own actions reach the audit log: the attack added nothing.
    assert read_events(dep.dir) == audit_before


def test_tls_secagg_run_aggregates_noise_the_runs_seed_cannot_predict(deployment, first_run):
    import math

    from fedlora import runtime
    from fedlora.server.checkpoint import load_checkpoint

    dep = deployment
    assert "completed" in first_run.stdout
    run_dir = dep.dir / "runs" / "first"
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "complete"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert all(r["num_devices"] == DEVICES for r in rows[1:])
    # One round of two DP steps with fresh noise need not lower the loss (it did whenever the
    # noise was seeded); it must stay finite and near the base model's.
    assert abs(rows[-1]["eval_loss"] - rows[0]["eval_loss"]) < 0.5, rows
    assert (run_dir / "privacy" / "report.json").exists()
    assert (run_dir / "export" / "manifest.json").exists()

    cfg_dict = json.loads((run_dir / "config.json").read_text())
    from fedlora.config import FedloraConfig

    cfg = FedloraConfig.from_dict(cfg_dict)
    bundle = runtime.model_bundle(cfg)
    names = bundle.names
    previous = [a.copy() for a in bundle.initial_arrays]
    # SecAgg+ quantizes every value to one of quantization_range levels over ±clipping_range.
    s = cfg.secagg
    step = 2 * s.clipping_range / (s.quantization_range - 1)
    got = load_checkpoint(run_dir / "checkpoints" / "round-0001.safetensors", names)
    moved = max(float(np.max(np.abs(g - p))) for g, p in zip(got, previous, strict=True))
    assert moved > 100 * DEVICES * step, "the round changed nothing"
    # lora_B starts at 0, so in round 1 lora_A gets no gradient until B has moved (after
    # one noisy step, a small gradient through B): its update is the devices' noise.
    a = [k for k, name in enumerate(names) if "lora_A" in name]
    seen = np.concatenate([(got[k] - previous[k]).ravel() for k in a]).astype(np.float64)
    predicted, weights, noise_std = _seed_predicted_round(dep, run_dir, 1, previous)
    guess = np.concatenate([(predicted[k] - previous[k]).ravel() for k in a]).astype(np.float64)
    total = float(sum(weights))
    want = math.sqrt(sum((w / total * sd) ** 2 for w, sd in zip(weights, noise_std, strict=True)))
    # ~20,000 values: the std is estimated to 0.5%, a correlation to ±0.007.
    assert seen.size > 10_000
    assert abs(seen.std() / want - 1) < 0.05, (seen.std(), want)  # all the promised noise
    assert abs(guess.std() / want - 1) < 0.05, (guess.std(), want)  # the guess is as noisy
    corr = float(np.corrcoef(seen, guess)[0, 1])
    assert abs(corr) < 0.05, f"the run's seed predicts the aggregate's noise (corr {corr:.3f})"

    # The coordinator's ledger is the union of what the devices recorded for this run.
    from fedlora.privacy import PrivacyLedger

    coord = PrivacyLedger.load(run_dir / "privacy" / "ledger.json")
    run_id = str(status["flower_run_id"])
    on_devices = sorted(
        (e.device, e.round, e.noise_multiplier)
        for i in range(DEVICES)
        for e in _device_ledger(dep, i).events
        if e.run == run_id
    )
    assert sorted((e.device, e.round, e.noise_multiplier) for e in coord.events) == on_devices


def test_device_downloads_released_model_and_rejects_a_tampered_transfer(
    deployment, first_run, tmp_path
):
    from fedlora.client.service_client import DeviceServiceClient
    from fedlora.errors import FedloraError
    from fedlora.export.manifest import sha256_file

    dep = deployment
    client = DeviceServiceClient(
        f"127.0.0.1:{dep.port + 2}", dep.ca, "device-0", dep.keys / "device-0.key"
    )
    with client:
        models = [m for m in client.list_models() if m.version.startswith("first/")]
        assert models, "the first run's int8 export is not released"
        model = next(m for m in models if "int8" in m.version)
        entry = max(model.files, key=lambda f: f.size_bytes)
        installed = client.download(model.version, entry.path, tmp_path / "ok")
        assert sha256_file(installed) == entry.sha256
        assert installed.stat().st_size == entry.size_bytes

        # A partial download whose bytes were altered: detected, nothing installed.
        dest = tmp_path / "bad"
        part = dest.joinpath(*Path(entry.path).parts)
        part = part.with_name(part.name + ".part")
        part.parent.mkdir(parents=True, exist_ok=True)
        good = installed.read_bytes()[: entry.size_bytes // 2]
        part.write_bytes(bytes([good[0] ^ 0xFF]) + good[1:])
        try:
            out = client.download(model.version, entry.path, dest)
        except FedloraError:
            out = None
        final = dest.joinpath(*Path(entry.path).parts)
        # Either refused, or restarted from zero and verified: never the tampered bytes.
        if out is None:
            assert not final.exists()
        else:
            assert sha256_file(final) == entry.sha256


def test_unregistered_device_is_refused_with_a_clear_message(deployment):
    dep = deployment
    res = dep.cli(
        "device",
        "--coordinator",
        dep.addr,
        "--data",
        str(dep.data / "device-0.jsonl"),
        "--key",
        str(dep.keys / "rogue.key"),
        "--root-cert",
        str(dep.ca),
        "--state-dir",
        str(dep.root / "rogue-state"),
        timeout=120,
    )
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "rogue" in err[0] and "regist" in err[0], err[0]


def _wait_for_round(run_dir: Path, rnd: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists():
            rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            if any(r["round"] == rnd for r in rows):
                return
        time.sleep(0.5)
    raise AssertionError(f"round {rnd} never finished in {run_dir}")


def test_coordinator_killed_mid_run_restarts_with_history_and_the_run_resumes(
    deployment, first_run
):
    from flwr.proto.control_pb2 import ListRunsRequest

    from fedlora.privacy import PrivacyLedger
    from fedlora.server.app import RUNS_DIR_ENV
    from fedlora.server.control import control_client
    from fedlora.testing.deployment import processes_mentioning

    dep = deployment
    first_report = (dep.dir / "runs" / "first" / "privacy" / "report.json").read_bytes()
    res = dep.run("second", _config(2, export=False), wait=False)
    assert res.returncode == 0, res.stderr
    run_dir = dep.dir / "runs" / "second"
    _wait_for_round(run_dir, 1, timeout_s=300)
    # The coordinator's ledger after round 1, as saved; then SIGKILL the whole coordinator.
    saved = (run_dir / "privacy" / "ledger.json").read_bytes()
    dep.kill("coordinator", signal.SIGKILL)
    assert not processes_mentioning(f"--fleet-api-address {dep.host}:{dep.port}"), (
        "SuperLink survived"
    )
    # The run's ServerApp (detached by Flower) notices its coordinator is gone and exits.
    deadline = time.monotonic() + 15
    while processes_mentioning(f"{RUNS_DIR_ENV}={dep.dir}") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_mentioning(f"{RUNS_DIR_ENV}={dep.dir}"), "a ServerApp outlived it"
    before = {i: _device_ledger(dep, i) for i in range(DEVICES)}

    dep.start_coordinator()
    # Run history: the SuperLink's SQLite state still knows both runs.
    with control_client(f"127.0.0.1:{dep.port + 1}", dep.ca, insecure=False) as client:
        runs = client.ListRuns(ListRunsRequest()).run_dict
    first_id = json.loads((dep.dir / "runs" / "first" / "run.json").read_text())["flower_run_id"]
    second_id = json.loads((run_dir / "run.json").read_text())["flower_run_id"]
    assert {int(first_id), int(second_id)} <= set(runs)
    assert runs[int(first_id)].status.sub_status == "completed"
    # fedlora's own history: the first run untouched, the cut one marked, its ledger intact.
    assert (dep.dir / "runs" / "first" / "privacy" / "report.json").read_bytes() == first_report
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    ledger = PrivacyLedger.load(run_dir / "privacy" / "ledger.json")  # checksum verified
    at_kill = PrivacyLedger.from_dict(json.loads(saved))
    assert ledger.events[: len(at_kill)] == at_kill.events, "the coordinator's ledger lost events"
    assert sorted(e.device for e in at_kill.events if e.round == 1) == [
        f"device-{i}" for i in range(DEVICES)
    ]
    # ... and it agrees with what the devices themselves recorded for that round.
    second_run = str(second_id)
    for e in at_kill.events:
        i = int(e.device.split("-")[1])
        assert e in before[i].events and e.run == second_run

    # The devices reconnect by themselves (the SuperLink sees all three online again) and
    # their ledgers, on their own disks, lost nothing.
    from flwr.proto.control_pb2 import ListNodesRequest

    deadline = time.monotonic() + 120
    online: list[str] = []
    while time.monotonic() < deadline:
        with control_client(f"127.0.0.1:{dep.port + 1}", dep.ca, insecure=False) as client:
            nodes = client.ListNodes(ListNodesRequest()).nodes_info
        online = sorted(n.name for n in nodes if n.status == "online")
        if online == [f"device-{i}" for i in range(DEVICES)]:
            break
        time.sleep(1)
    assert online == [f"device-{i}" for i in range(DEVICES)], online
    for i in range(DEVICES):
        after = _device_ledger(dep, i)
        assert after.events[: len(before[i])] == before[i].events, "a device ledger lost events"
        assert {e.run for e in after.events} >= {str(first_id), second_run}

    # The operator resumes the cut run: it continues after its last committed round with
    # the global adapter, sampler and ledger as they were, under a new Flower run id.
    state = json.loads((run_dir / "state.json").read_text())["state"]
    res = dep.resume("second")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "complete"
    (resumed,) = status["resumed"]
    assert resumed["at_round"] == state["round"] + 1
    resumed_run = str(resumed["flower_run_id"])
    assert resumed_run != second_run
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    final = PrivacyLedger.load(run_dir / "privacy" / "ledger.json")
    # Nothing the coordinator had recorded before the kill was lost ...
    assert final.events[: len(at_kill)] == at_kill.events
    # ... every round of the run is in it exactly once per segment that trained it, and it
    # is exactly the union of what the devices recorded for this run under either id.
    devices_view = [
        e
        for i in range(DEVICES)
        for e in _device_ledger(dep, i).events
        if e.run in (second_run, resumed_run)
    ]
    key = lambda e: (e.device, e.run, e.round)  # noqa: E731
    assert sorted(final.events, key=key) == sorted(devices_view, key=key)
    assert len({key(e) for e in final.events}) == len(final)
    assert {e.round for e in final.events if e.run == resumed_run} == {2}
    # The report's totals are the devices' own: ε recomputed from each device's ledger
    # (this run's events under either id; the devices' ledgers also hold the first run).
    from fedlora.privacy import epsilon_for

    report = json.loads((run_dir / "privacy" / "report.json").read_text())
    assert report["run"]["resumed_at"] == [2]
    for d in report["devices"]:
        i = int(d["device"].split("-")[1])
        own = [e for e in _device_ledger(dep, i).events if e.run in (second_run, resumed_run)]
        want = epsilon_for(own, report["delta"], report["accountant"])
        assert d["epsilon"] == pytest.approx(want, rel=1e-9)
