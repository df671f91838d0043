"""The coordinator's ModelService and PrivacyService over real TLS, with real signed calls."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedlora.client.service_client import (
    DOWNLOAD_MODEL,
    LIST_MODELS,
    DeviceServiceClient,
    ServiceCallError,
)
from fedlora.errors import ConfigError, ExportError
from fedlora.keys import (
    METADATA_DEVICE,
    METADATA_NONCE,
    METADATA_SIGNATURE,
    METADATA_TIMESTAMP,
    generate_device_key,
    init_pki,
    load_private_key,
    sign_call,
)
from fedlora.privacy import PrivacyLedger, epsilon_for
from fedlora.privacy.accountants.ddg import epsilon_for_device
from fedlora.server.service import CHUNK_BYTES, Caller, ModelServicer
from fedlora.v1 import model_service_pb2 as pb
from fedlora.v1 import model_service_pb2_grpc
from tests.service.conftest import Coordinator, running
from tests.service.helpers import ddg_event, touch_later, write_device_level_run

INT8 = ("run-a/int8", "int8/model.bin")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ models
def test_lists_released_models_with_their_manifest_figures(server: Any, connect: Any) -> None:
    models = {m.version: m for m in connect(server).list_models()}

    assert sorted(models) == ["run-a/int8", "run-a/merged"]  # q4 failed its gate
    int8 = models["run-a/int8"]
    assert (int8.run, int8.name, int8.format, int8.quantization) == (
        "run-a",
        "int8",
        "pytorch-int8",
        "int8",
    )
    assert int8.quality == {"kl": 0.004, "top1_agreement": 0.97}
    assert int8.quality_reference == "merged"
    assert models["run-a/merged"].quality["perplexity"] == 41.5
    merged = models["run-a/merged"]
    assert merged.size_bytes == 1_300_000 + len(json.dumps({"vocab_size": 97}))
    assert [f.path for f in merged.files] == ["merged/config.json", "merged/model.safetensors"]


def test_downloads_a_file_and_verifies_it(
    coordinator: Coordinator, server: Any, connect: Any, tmp_path: Path
) -> None:
    dest = connect(server).download(*INT8, tmp_path / "models")

    source = coordinator.data_dir / "runs" / "run-a" / "export" / "int8" / "model.bin"
    assert dest == tmp_path / "models" / "int8" / "model.bin"
    assert dest.read_bytes() == source.read_bytes()
    assert not dest.with_name("model.bin.part").exists()


class Faulty:
    """A ModelService that wraps the real one and misbehaves on demand, and records offsets."""

    def __init__(self, data_dir: Path) -> None:
        self.real = ModelServicer(data_dir)
        self.mode = "ok"
        self.offsets: list[int] = []

    def ListModels(self, request: Any, context: Any, caller: Caller) -> Any:
        return self.real.ListModels(request, context, caller)

    def DownloadModel(self, request: Any, context: Any, caller: Caller) -> Iterator[Any]:
        self.offsets.append(request.offset)
        for i, response in enumerate(self.real.DownloadModel(request, context, caller)):
            if self.mode == "truncate" and i == 3:  # header + 2 chunks, then the stream ends
                return
            if self.mode == "flip" and i == 2:
                data = bytearray(response.chunk.data)
                data[7] ^= 0x01
                response.chunk.data = bytes(data)
            yield response


@pytest.fixture
def faulty(coordinator: Coordinator) -> Iterator[tuple[Faulty, Any]]:
    service = Faulty(coordinator.data_dir)
    with running(coordinator.data_dir, model_servicer=service) as srv:
        yield service, srv


def test_truncated_transfer_installs_nothing_and_resumes(
    faulty: tuple[Faulty, Any], connect: Any, coordinator: Coordinator, tmp_path: Path
) -> None:
    service, srv = faulty
    client = connect(srv)
    dest = tmp_path / "int8" / "model.bin"
    service.mode = "truncate"

    with pytest.raises(
        ExportError, match=r"stopped at byte 524288 of 700001.*run it again to resume"
    ):
        client.download(*INT8, tmp_path)
    assert not dest.exists()
    assert dest.with_name("model.bin.part").stat().st_size == 2 * CHUNK_BYTES

    service.mode = "ok"
    client.download(*INT8, tmp_path)

    assert service.offsets == [0, 2 * CHUNK_BYTES]
    source = coordinator.data_dir / "runs" / "run-a" / "export" / "int8" / "model.bin"
    assert _sha(dest) == _sha(source)
    assert not dest.with_name("model.bin.part").exists()


def test_corrupted_transfer_installs_nothing_and_deletes_the_part(
    faulty: tuple[Faulty, Any], connect: Any, tmp_path: Path
) -> None:
    service, srv = faulty
    service.mode = "flip"

    with pytest.raises(ExportError, match=r"arrived corrupted.*nothing was installed"):
        connect(srv).download(*INT8, tmp_path)

    assert not (tmp_path / "int8" / "model.bin").exists()
    assert not (tmp_path / "int8" / "model.bin.part").exists()


def test_a_tampered_partial_file_is_refetched_from_the_start(
    faulty: tuple[Faulty, Any], connect: Any, coordinator: Coordinator, tmp_path: Path
) -> None:
    service, srv = faulty
    client = connect(srv)
    service.mode = "truncate"
    with pytest.raises(ExportError):
        client.download(*INT8, tmp_path)
    part = tmp_path / "int8" / "model.bin.part"
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))

    service.mode = "ok"
    dest = client.download(*INT8, tmp_path)

    assert service.offsets == [0, 2 * CHUNK_BYTES, 0]  # prefix refused, then from the start
    source = coordinator.data_dir / "runs" / "run-a" / "export" / "int8" / "model.bin"
    assert _sha(dest) == _sha(source)


def test_unknown_versions_files_and_traversal_are_refused(
    coordinator: Coordinator, server: Any, connect: Any, tmp_path: Path
) -> None:
    client = connect(server)
    key = load_private_key(coordinator.key("d1"))
    with grpc.secure_channel(
        f"127.0.0.1:{server.port}", grpc.ssl_channel_credentials(coordinator.ca.read_bytes())
    ) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)

        def raw(version: str, path: str, offset: int = 0) -> grpc.StatusCode:
            request = pb.DownloadModelRequest(version=version, path=path, offset=offset)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.DownloadModel(request, metadata=sign_call(key, DOWNLOAD_MODEL, "d1")))
            return err.value.code()

        assert raw("run-a/int8", "../../../tls/ca.key") == grpc.StatusCode.INVALID_ARGUMENT
        assert raw("run-a/int8", "/etc/passwd") == grpc.StatusCode.INVALID_ARGUMENT
        assert raw("run-a/int8", "merged/model.safetensors") == grpc.StatusCode.NOT_FOUND
        assert raw("run-a/q4", "q4/model.gguf") == grpc.StatusCode.NOT_FOUND  # gate failed
        assert raw("run-x/int8", "int8/model.bin") == grpc.StatusCode.NOT_FOUND
        assert raw(*INT8, offset=10**9) == grpc.StatusCode.OUT_OF_RANGE

    with pytest.raises(ExportError, match="no released model 'run-a/q4'"):
        client.download("run-a/q4", "q4/model.gguf", tmp_path)
    with pytest.raises(ConfigError, match="not a model file path"):
        client.download("run-a/int8", "../int8/model.bin", tmp_path)


# ------------------------------------------------------------------ authentication
def test_an_unregistered_device_is_told_to_get_registered(server: Any, connect: Any) -> None:
    with pytest.raises(ServiceCallError) as err:
        connect(server, "stranger").list_models()

    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "device stranger is not registered with this coordinator" in str(err.value)
    assert "fedlora keys register" in str(err.value)


def test_a_signature_from_another_key_is_refused(
    coordinator: Coordinator, server: Any, connect: Any
) -> None:
    with pytest.raises(ServiceCallError) as err:
        connect(server, "d1", key=coordinator.key("d2")).list_models()

    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "signature is not d1's registered key's" in str(err.value)


def test_revoked_and_newly_registered_devices_take_effect_without_restart(
    coordinator: Coordinator, server: Any, connect: Any
) -> None:
    from fedlora.keys import DeviceRegistry

    DeviceRegistry(coordinator.data_dir).revoke("d2")
    with pytest.raises(ServiceCallError, match="device d2 is not registered"):
        connect(server, "d2").list_models()
    stranger_pub = coordinator.keys_dir / "stranger.pub"
    DeviceRegistry(coordinator.data_dir).register("stranger", stranger_pub.read_bytes())
    assert len(connect(server, "stranger").list_models()) == 2


def _old_format(key: Any) -> tuple[tuple[str, str | bytes], ...]:
    """A call as fedlora signed it before nonces: ``method|id|timestamp``, no nonce entry."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    ts = int(time.time())
    signature = key.sign(f"{LIST_MODELS}|d1|{ts}".encode(), ec.ECDSA(hashes.SHA256()))
    return ((METADATA_DEVICE, "d1"), (METADATA_TIMESTAMP, str(ts)), (METADATA_SIGNATURE, signature))


def _other_nonce(key: Any) -> tuple[tuple[str, str | bytes], ...]:
    """A real signed call whose nonce was swapped for another after signing."""
    return tuple(
        (name, "ab" * 16 if name == METADATA_NONCE else value)
        for name, value in sign_call(key, LIST_MODELS, "d1")
    )


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (lambda key: sign_call(key, LIST_MODELS, "d1", int(time.time()) - 301), "behind"),
        (lambda key: sign_call(key, LIST_MODELS, "d1", int(time.time()) + 400), "ahead of"),
        (lambda key: sign_call(key, DOWNLOAD_MODEL, "d1"), "signature is not"),  # other method
        (_other_nonce, "signature is not"),  # the nonce is covered by the signature
        (_old_format, "carries no nonce"),
        (lambda key: sign_call(key, LIST_MODELS, "d1", nonce="x" * 32), "nonce is not"),
        (lambda key: sign_call(key, LIST_MODELS, "d1")[:2], "not signed"),
        (lambda key: (), "not signed"),
    ],
)
def test_stale_forged_or_missing_signatures_are_refused(
    coordinator: Coordinator, server: Any, metadata: Any, message: str
) -> None:
    key = load_private_key(coordinator.key("d1"))
    with grpc.secure_channel(
        f"127.0.0.1:{server.port}", grpc.ssl_channel_credentials(coordinator.ca.read_bytes())
    ) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListModels(pb.ListModelsRequest(), metadata=metadata(key), timeout=10)

    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert message in err.value.details()


def test_a_replayed_call_is_refused_the_second_time(coordinator: Coordinator, server: Any) -> None:
    # arrange: one signed call, as a listener past TLS would have captured it
    key = load_private_key(coordinator.key("d1"))
    captured = sign_call(key, LIST_MODELS, "d1")
    with grpc.secure_channel(
        f"127.0.0.1:{server.port}", grpc.ssl_channel_credentials(coordinator.ca.read_bytes())
    ) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        # act
        first = stub.ListModels(pb.ListModelsRequest(), metadata=captured, timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListModels(pb.ListModelsRequest(), metadata=captured, timeout=10)
        fresh = stub.ListModels(
            pb.ListModelsRequest(), metadata=sign_call(key, LIST_MODELS, "d1"), timeout=10
        )

    # assert
    assert len(first.models) == 2
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.details().startswith("the call replays an earlier call of d1")
    assert "\n" not in err.value.details()
    assert len(fresh.models) == 2  # a newly signed call goes through


def test_the_service_client_signs_every_call_afresh(server: Any, connect: Any) -> None:
    client = connect(server)

    results = [len(client.list_models()) for _ in range(3)]

    assert results == [2, 2, 2]


def test_a_client_that_does_not_trust_the_coordinators_ca_cannot_connect(
    coordinator: Coordinator, server: Any, tmp_path: Path
) -> None:
    other_ca = init_pki(tmp_path / "other").ca
    client = DeviceServiceClient(
        f"127.0.0.1:{server.port}", other_ca, "d1", coordinator.key("d1"), timeout=5
    )
    try:
        with pytest.raises(ServiceCallError) as err:
            client.list_models()
    finally:
        client.close()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


# ------------------------------------------------------------------ privacy
def _ledger(coordinator: Coordinator, run: str) -> PrivacyLedger:
    return PrivacyLedger.load(coordinator.data_dir / "runs" / run / "privacy" / "ledger.json")


def test_budget_is_the_composition_of_the_devices_events_over_every_run(
    coordinator: Coordinator, server: Any, connect: Any
) -> None:
    budget = connect(server, "d1").budget()

    events = [
        *_ledger(coordinator, "run-a").events_for("d1"),
        *_ledger(coordinator, "run-b").events_for("d1"),
    ]
    expected = epsilon_for(events, 1e-5, "rdp")
    assert budget.epsilon_spent == pytest.approx(expected, rel=1e-12)
    assert expected > epsilon_for(_ledger(coordinator, "run-a").events_for("d1"), 1e-5, "rdp")
    assert budget.epsilon_budget == 4.0  # run-b's: the latest run d1 trained in
    assert budget.epsilon_remaining == pytest.approx(4.0 - expected)
    assert (budget.delta, budget.accountant, budget.rounds_trained) == (1e-5, "rdp", 3)
    assert (budget.runs, budget.budget_run) == (("run-a", "run-b"), "run-b")


def test_budget_of_a_device_that_trained_in_one_run(
    coordinator: Coordinator, server: Any, connect: Any
) -> None:
    budget = connect(server, "d2").budget()

    expected = epsilon_for(_ledger(coordinator, "run-a").events_for("d2"), 1e-5, "rdp")
    assert budget.epsilon_spent == pytest.approx(expected, rel=1e-12)
    assert (budget.epsilon_budget, budget.rounds_trained, budget.runs) == (3.0, 1, ("run-a",))


def test_a_device_may_not_ask_for_another_devices_budget(server: Any, connect: Any) -> None:
    with pytest.raises(ServiceCallError) as err:
        connect(server, "d1").budget("d2")

    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "only ask for its own budget" in str(err.value)


def test_the_operator_may_ask_for_any_budget(server: Any, connect: Any) -> None:
    operator = connect(server, "operator")

    assert operator.budget("d2").rounds_trained == 1
    assert connect(server, "d2").budget() == operator.budget("d2")


def test_fleet_report_is_for_the_operator_only(
    coordinator: Coordinator, server: Any, connect: Any
) -> None:
    with pytest.raises(ServiceCallError) as err:
        connect(server, "d1").fleet_report()
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED

    run, text = connect(server, "operator").fleet_report("run-a")
    report = json.loads(text)
    assert run == "run-a"
    assert report["format"] == "fedlora.privacy.report"
    d2 = next(d for d in report["devices"] if d["device"] == "d2")
    assert d2["epsilon"] == pytest.approx(
        epsilon_for(_ledger(coordinator, "run-a").events_for("d2"), 1e-5, "rdp")
    )
    assert connect(server, "operator").fleet_report()[0] == "run-b"  # the latest ledger
    with pytest.raises(ServiceCallError) as missing:
        connect(server, "operator").fleet_report("run-z")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND


def test_an_edited_ledger_is_refused_not_under_counted(
    coordinator: Coordinator, server: Any, connect: Any
) -> None:
    path = coordinator.data_dir / "runs" / "run-b" / "privacy" / "ledger.json"
    data = json.loads(path.read_text())
    data["events"][0]["steps"] = 1
    path.write_text(json.dumps(data))

    with pytest.raises(ServiceCallError) as err:
        connect(server, "d1").budget()

    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "checksum mismatch" in str(err.value)


def test_a_new_ledger_round_is_seen_without_restart(
    coordinator: Coordinator, server: Any, connect: Any
) -> None:
    from tests.service.helpers import event, touch_later

    client = connect(server, "d2")
    before = client.budget()
    path = coordinator.data_dir / "runs" / "run-b" / "privacy" / "ledger.json"
    ledger = _ledger(coordinator, "run-b")
    ledger.append(event("d2", 1))
    ledger.save(path)
    touch_later(path, 120)

    after = client.budget()

    assert (before.rounds_trained, after.rounds_trained) == (1, 2)
    assert after.budget_run == "run-b"
    assert after.epsilon_spent > before.epsilon_spent


def test_without_an_operator_key_operator_calls_are_refused(
    coordinator: Coordinator, server: Any, connect: Any, tmp_path: Path
) -> None:
    (coordinator.data_dir / "tls" / "operator.pub").unlink()

    with pytest.raises(ServiceCallError) as err:
        connect(server, "operator").fleet_report()

    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "no operator key" in str(err.value)


def test_a_device_key_cannot_sign_as_the_operator(
    coordinator: Coordinator, server: Any, tmp_path: Path
) -> None:
    key, _ = generate_device_key(tmp_path, "mallory")
    client = DeviceServiceClient(
        f"127.0.0.1:{server.port}", coordinator.ca, "operator", key, timeout=10
    )
    try:
        with pytest.raises(ServiceCallError) as err:
            client.fleet_report()
    finally:
        client.close()
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_wait_ready_connects_or_says_the_coordinator_is_unreachable(
    coordinator: Coordinator, server: Any, connect: Any
) -> None:
    connect(server).wait_ready(5)
    port = server.port
    server.stop(None).wait()
    client = DeviceServiceClient(f"127.0.0.1:{port}", coordinator.ca, "d1", coordinator.key("d1"))
    try:
        with pytest.raises(ServiceCallError, match="cannot reach") as err:
            client.wait_ready(0.5)
    finally:
        client.close()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_device_level_rounds_are_answered_in_their_own_unit_not_as_nothing_spent(
    coordinator: Coordinator, server: Any, connect: Any
) -> None:
    """A device of a device-level run asks the coordinator what it has spent: its rounds
    in distributed-DP sums are composed by the device-level accountant, at the run's
    device δ, against privacy.device.epsilon; the record-level answer stays as it was."""
    run_c = coordinator.data_dir / "runs" / "run-c"
    write_device_level_run(
        run_c,
        [ddg_event("d2", 1, survivors=9), ddg_event("d2", 2, survivors=8)],
        unit="device",
        device_epsilon=6.0,
    )
    touch_later(run_c / "privacy" / "ledger.json", 120)

    budget = connect(server, "d2").budget()

    ledger = _ledger(coordinator, "run-c")
    expected = epsilon_for_device(ledger.events_for("d2", unit="device"), 1e-6)
    assert budget.device_level is not None
    dl = budget.device_level
    assert dl.epsilon_spent == pytest.approx(expected, rel=1e-12) and expected > 0
    assert (dl.epsilon_budget, dl.delta, dl.accountant) == (6.0, 1e-6, "ddg-rdp")
    assert dl.epsilon_remaining == pytest.approx(6.0 - expected)
    assert (dl.rounds, dl.runs) == (2, ("run-c",))
    # The policy in force is run-c's (the latest run d2 was in), which protects devices.
    assert (budget.budget_run, budget.policy_unit) == ("run-c", "device")
    # Record-level: d2's one DP-SGD round of run-a, composed by the policy in force's
    # accountant (run-c's default, PRV).
    record = epsilon_for(_ledger(coordinator, "run-a").events_for("d2"), 1e-5, "prv")
    assert budget.epsilon_spent == pytest.approx(record, rel=1e-12)
    assert budget.accountant == "prv"
    assert (budget.rounds_trained, budget.runs) == (1, ("run-a",))

    # d1 was never in a device-level sum and its latest run protects records: none.
    d1 = connect(server, "d1").budget()
    assert (d1.device_level, d1.policy_unit, d1.budget_run) == (None, "record", "run-b")
    # The operator asks about a device that never trained: the policy in force (run-c's)
    # protects devices, so the answer says 0 spent of the device budget.
    fresh = connect(server, "operator").budget("d9")
    assert fresh.device_level is not None
    assert (fresh.device_level.epsilon_spent, fresh.device_level.rounds) == (0.0, 0)
    assert fresh.device_level.epsilon_budget == 6.0
