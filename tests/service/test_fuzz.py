"""Fuzzing the coordinator services' proto-facing parsers, in process.

Arbitrary bytes go through each request's ``FromString`` (what gRPC's deserializer
calls) and, when they parse, straight into the servicer method with a stand-in for
gRPC's servicer context that records the status a call is aborted with. The unit
under test is the parsing and checking of request fields, so the transport is left
out; ``test_service.py`` covers the same servicers over real TLS. Properties: the
only failures are a protobuf ``DecodeError`` (gRPC answers it with a status) or a
clean abort with an expected status code; nothing hangs (hypothesis deadline); no
byte outside a released model's listed files is ever streamed.

The device side is fuzzed the same way: the ``from_proto`` conversions of what a
coordinator answers, the signed-call metadata parser, and the checks that keep a
listed file path inside the download directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedlora.cli.service import _local_path
from fedlora.client.service_client import Budget, RemoteModel, _check_relative
from fedlora.errors import ConfigError, ExportError
from fedlora.export.manifest import MANIFEST_FORMAT, MANIFEST_VERSION, write_manifest
from fedlora.keys import (
    METADATA_DEVICE,
    METADATA_NONCE,
    METADATA_SIGNATURE,
    METADATA_TIMESTAMP,
    DeviceRegistry,
    generate_device_key,
    init_pki,
    load_private_key,
    sign_call,
)
from fedlora.server.service import (
    Authenticator,
    Caller,
    ModelServicer,
    PrivacyServicer,
    Unauthenticated,
)
from fedlora.v1 import model_service_pb2 as model_pb
from fedlora.v1 import privacy_service_pb2 as privacy_pb
from tests.service.helpers import GATE, event, write_export, write_run

SECRET = b"TOP-SECRET-NOT-A-MODEL-FILE"
FAST = settings(
    max_examples=150,
    deadline=2000,  # ms per example: a parse or a call that hangs fails the test
    suppress_health_check=[HealthCheck.too_slow],
)


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    """What a servicer uses of ``grpc.ServicerContext``: ``abort`` raises, as gRPC's does."""

    def __init__(self) -> None:
        self.aborts: list[grpc.StatusCode] = []

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborts.append(code)
        raise Aborted(code, details)

    def is_active(self) -> bool:
        return True


# ------------------------------------------------------------------ the coordinator
def _evil_export(run_dir: Path, secret: Path) -> None:
    """A manifest that lists a symlink out of its export (passes every manifest check),
    one that lists a '..' path (refused when the manifest is read), and one whose file
    changed on disk after the export."""
    export = run_dir / "export"
    (export / "evil").mkdir(parents=True)
    os.symlink(secret, export / "evil" / "model.bin")
    (export / "stale").mkdir()
    (export / "stale" / "model.bin").write_bytes(b"short")
    entry = {
        "path": "evil/model.bin",
        "bytes": len(SECRET),
        "sha256": hashlib.sha256(SECRET).hexdigest(),
    }
    quality = {"kl": 0.0, "top1_agreement": 1.0, "reference": "merged"}

    def artefact(name: str, files: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "name": name,
            "format": "safetensors",
            "quantization": "none",
            "path": name,
            "files": files,
            "total_bytes": len(SECRET),
            "quality": quality,
            "gate": GATE,
        }

    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "artefacts": [
            artefact("symlink", [entry]),
            artefact("dotdot", [{**entry, "path": "../../../secret.txt"}]),
            artefact("stale", [{**entry, "path": "stale/model.bin"}]),
        ],
    }
    write_manifest(export, manifest)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fuzz")
    data_dir = root / "coordinator"
    init_pki(data_dir)
    _, pub = generate_device_key(root / "keys", "d1")
    DeviceRegistry(data_dir).register("d1", pub.read_bytes())
    secret = data_dir / "secret.txt"
    secret.write_bytes(SECRET)
    (data_dir / "runs" / "run-a").mkdir(parents=True)
    (data_dir / "runs" / "run-a" / "secret.txt").write_bytes(SECRET)
    manifest = write_export(data_dir / "runs" / "run-a")
    write_run(data_dir / "runs" / "run-a", [event("d1", 1), event("d2", 1)], epsilon=3.0)
    write_run(data_dir / "runs" / "run-b", [event("d1", 1, sigma=1.5)], epsilon=4.0)
    _evil_export(data_dir / "runs" / "run-evil", secret)
    released = {
        (f"run-a/{a['name']}", f["path"]): (data_dir / "runs" / "run-a" / "export" / f["path"])
        for a in manifest["artefacts"]
        if a["name"] != "q4"  # outside its gate: not released
        for f in a["files"]
    }
    models = ModelServicer(data_dir, chunk_bytes=256 * 1024)
    privacy = PrivacyServicer(data_dir)
    # Warm the per-snapshot caches, so the deadline measures the parsing, not the accountant.
    for run in ("", "run-a", "run-b"):
        privacy.GetFleetReport(
            privacy_pb.GetFleetReportRequest(run=run), FakeContext(), Caller("operator")
        )
    return {
        "data_dir": data_dir,
        "key": load_private_key(root / "keys" / "d1.key"),
        "released": {k: v.read_bytes() for k, v in released.items()},
        "models": models,
        "privacy": privacy,
    }


def test_the_fixture_releases_what_it_should_and_refuses_the_traps(coordinator):
    """The control for the fuzz below: the real files stream, the symlinked one and the
    one changed since its export do not."""
    models = coordinator["models"]
    listed = models.ListModels(model_pb.ListModelsRequest(), FakeContext(), Caller("d1"))
    assert sorted(m.version for m in listed.models) == [
        "run-a/int8",
        "run-a/merged",
        "run-evil/stale",
        "run-evil/symlink",
    ]
    ctx = FakeContext()
    with pytest.raises(Aborted):
        models.DownloadModel(
            model_pb.DownloadModelRequest(version="run-evil/symlink", path="evil/model.bin"),
            ctx,
            Caller("d1"),
        )
    assert ctx.aborts == [grpc.StatusCode.PERMISSION_DENIED]
    ctx = FakeContext()
    with pytest.raises(Aborted):
        models.DownloadModel(
            model_pb.DownloadModelRequest(version="run-evil/stale", path="stale/model.bin"),
            ctx,
            Caller("d1"),
        )
    assert ctx.aborts == [grpc.StatusCode.DATA_LOSS]
    request = model_pb.DownloadModelRequest(version="run-a/int8", path="int8/model.bin")
    data = b"".join(
        r.chunk.data
        for r in models.DownloadModel(request, FakeContext(), Caller("d1"))
        if r.HasField("chunk")
    )
    assert data == coordinator["released"][("run-a/int8", "int8/model.bin")]


# ------------------------------------------------------------------ wire formats
def wire(message: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Bytes as they could arrive: a well-formed message, one with junk appended or cut
    short, or any bytes at all."""
    good = message.map(lambda m: m.SerializeToString())
    return st.one_of(
        good,
        st.tuples(good, st.binary(max_size=32)).map(lambda t: t[0] + t[1]),
        st.tuples(good, st.integers(0, 64)).map(lambda t: t[0][: t[1]]),
        st.binary(max_size=256),
    )


def parse(cls: Any, data: bytes) -> Any | None:
    """``cls.FromString(data)``, or None where protobuf refuses the bytes (the only
    failure allowed: gRPC turns it into a status before any servicer runs)."""
    try:
        return cls.FromString(data)
    except DecodeError:
        return None


VERSIONS = [
    "run-a/int8",
    "run-a/merged",
    "run-a/q4",
    "run-evil/symlink",
    "run-evil/dotdot",
    "run-evil/stale",
]
PATHS = [
    "int8/model.bin",
    "merged/config.json",
    "merged/model.safetensors",
    "q4/model.gguf",
    "evil/model.bin",
    "stale/model.bin",
    "secret.txt",
    "../secret.txt",
    "../../secret.txt",
    "../../../secret.txt",
    "int8/../../secret.txt",
    "int8/../../../secret.txt",
    "..\\..\\secret.txt",
    "/etc/passwd",
    str(Path("/").resolve() / "etc" / "hostname"),
    ".",
    "./int8/model.bin",
    "int8//model.bin",
    "int8/model.bin/",
    "%2e%2e/secret.txt",
    "int8/model.bin\x00",
    "\x00",
    "../run-a/export/int8/model.bin",
]
TEXT = st.text(max_size=40)
#: (version, path) of every file a manifest lists, released or not.
LISTED = [
    ("run-a/int8", "int8/model.bin"),
    ("run-a/merged", "merged/config.json"),
    ("run-a/merged", "merged/model.safetensors"),
    ("run-a/q4", "q4/model.gguf"),
    ("run-evil/symlink", "evil/model.bin"),
    ("run-evil/dotdot", "../../../secret.txt"),
    ("run-evil/stale", "stale/model.bin"),
]
OFFSETS = st.one_of(
    st.sampled_from([0, 0, 1, 17, 700_000, 700_001, 700_002, 1_300_000, 1_300_001]),
    st.integers(0, 2_000_000),
    st.sampled_from([2**63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)
DOWNLOADS = st.one_of(
    # A listed file (the offset decides between a stream and OUT_OF_RANGE) ...
    st.tuples(st.sampled_from(LISTED), st.sampled_from([0, 1, 17]) | OFFSETS).map(
        lambda t: model_pb.DownloadModelRequest(version=t[0][0], path=t[0][1], offset=t[1])
    ),
    # ... a real version with a path that tries to leave its export ...
    st.builds(
        model_pb.DownloadModelRequest,
        version=st.sampled_from(VERSIONS),
        path=st.sampled_from(PATHS),
        offset=OFFSETS,
    ),
    # ... or anything.
    st.builds(
        model_pb.DownloadModelRequest,
        version=st.sampled_from(VERSIONS) | TEXT,
        path=st.sampled_from(PATHS) | TEXT,
        offset=OFFSETS,
    ),
)
DOWNLOAD_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.OUT_OF_RANGE,
}
CALLERS = st.sampled_from([Caller("d1"), Caller("d2"), Caller("operator")])


def _drain(responses: Iterator[Any], limit: int = 64) -> list[Any]:
    out = []
    for response in responses:
        out.append(response)
        assert len(out) <= limit, "the stream does not end"
    return out


# ------------------------------------------------------------------ ModelService
def _examples_of_every_listed_file(test: Any) -> Any:
    for version, path in LISTED:
        request = model_pb.DownloadModelRequest(version=version, path=path, offset=0)
        test = example(data=request.SerializeToString(), caller=Caller("d1"))(test)
    return test


@FAST
@given(data=wire(DOWNLOADS), caller=CALLERS)
@_examples_of_every_listed_file
def test_download_serves_only_listed_files_or_ends_with_a_clean_status(coordinator, data, caller):
    request = parse(model_pb.DownloadModelRequest, data)
    if request is None:
        return
    ctx = FakeContext()
    try:
        responses = _drain(coordinator["models"].DownloadModel(request, ctx, caller))
    except Aborted as abort:
        assert abort.code in DOWNLOAD_CODES, abort
        return
    assert not ctx.aborts
    key = (request.version, request.path)
    assert key in coordinator["released"], f"served {key}, which is not a released file"
    content = coordinator["released"][key]
    header, chunks = responses[0], responses[1:]
    assert header.HasField("header") and header.header.offset == request.offset
    assert header.header.size_bytes == len(content)
    assert header.header.sha256 == hashlib.sha256(content).hexdigest()
    position = request.offset
    for r in chunks:
        assert r.HasField("chunk") and r.chunk.offset == position
        position += len(r.chunk.data)
    served = b"".join(r.chunk.data for r in chunks)
    assert served == content[request.offset :]
    assert SECRET not in served


@FAST
@given(data=st.binary(max_size=256), caller=CALLERS)
def test_list_models_ignores_whatever_the_request_carries(coordinator, data, caller):
    request = parse(model_pb.ListModelsRequest, data)
    if request is None:
        return
    response = coordinator["models"].ListModels(request, FakeContext(), caller)
    assert sorted(m.version for m in response.models) == [
        "run-a/int8",
        "run-a/merged",
        "run-evil/stale",
        "run-evil/symlink",
    ]


# ------------------------------------------------------------------ PrivacyService
DEVICE_IDS = st.sampled_from(["", "d1", "d2", "operator", "../d1", "d1\x00"]) | TEXT
BUDGET_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
}


@FAST
@given(data=wire(st.builds(privacy_pb.GetBudgetRequest, device_id=DEVICE_IDS)), caller=CALLERS)
def test_get_budget_answers_only_the_caller_or_the_operator(coordinator, data, caller):
    request = parse(privacy_pb.GetBudgetRequest, data)
    if request is None:
        return
    try:
        response = coordinator["privacy"].GetBudget(request, FakeContext(), caller)
    except Aborted as abort:
        assert abort.code in BUDGET_CODES, abort
        return
    asked = request.device_id or caller.id
    assert response.device_id == asked
    assert caller.operator or asked == caller.id
    assert response.epsilon_spent >= 0 and response.epsilon_budget in (3.0, 4.0)
    if asked == "d1":
        assert sorted(response.runs) == ["run-a", "run-b"] and response.rounds_trained == 2


RUN_NAMES = (
    st.sampled_from(["", "run-a", "run-b", "run-evil", ".", "..", "../run-a", "run-a/../run-b"])
    | st.sampled_from(["/", "\\", "run-a\x00", "runs/run-a", "%2e%2e"])
    | TEXT
)
REPORT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}


@FAST
@given(data=wire(st.builds(privacy_pb.GetFleetReportRequest, run=RUN_NAMES)), caller=CALLERS)
def test_fleet_report_names_only_runs_under_the_runs_directory(coordinator, data, caller):
    request = parse(privacy_pb.GetFleetReportRequest, data)
    if request is None:
        return
    try:
        response = coordinator["privacy"].GetFleetReport(request, FakeContext(), caller)
    except Aborted as abort:
        assert abort.code in REPORT_CODES, abort
        return
    assert caller.operator
    assert response.run in ("run-a", "run-b")
    assert response.run == (request.run or response.run)
    assert isinstance(json.loads(response.report_json), dict)


# ------------------------------------------------------------------ call signatures
METHOD = "/fedlora.v1.ModelService/ListModels"


@st.composite
def metadata(draw: st.DrawFn, key: Any) -> list[tuple[str, str | bytes]]:
    """Call metadata as gRPC hands it over: str values, bytes for '-bin' keys. Often a
    real signed call, then perhaps with one entry changed, dropped or repeated."""
    if draw(st.sampled_from([True, True, True, False])):
        entries = list(sign_call(key, METHOD, draw(st.sampled_from(["d1", "d2", "operator"]))))
    else:
        entries = []
    for _ in range(draw(st.sampled_from([0, 1, 1, 2, 3]))):
        name = draw(
            st.sampled_from(
                [METADATA_DEVICE, METADATA_TIMESTAMP, METADATA_NONCE, METADATA_SIGNATURE, "x-other"]
            )
        )
        value: str | bytes
        if name.endswith("-bin"):
            value = draw(st.binary(max_size=80))
        else:
            value = draw(
                st.sampled_from(
                    ["d1", "operator", "1" * 5000, "-1", "1e9", "0x10", " 17 ", "ab" * 16]
                )
                | st.integers(-(2**70), 2**70).map(str)
                | TEXT
            )
        action = draw(st.sampled_from(["replace", "add", "drop"]))
        entries = [e for e in entries if action == "add" or e[0] != name]
        if action != "drop":
            entries.append((name, value))
    return entries


def test_a_real_signed_call_is_accepted(coordinator):
    auth = Authenticator(coordinator["data_dir"])
    assert auth.authenticate(METHOD, sign_call(coordinator["key"], METHOD, "d1")) == Caller("d1")


@FAST
@given(data=st.data())
def test_call_metadata_either_names_a_verified_caller_or_is_refused(coordinator, data):
    key = coordinator["key"]
    entries = data.draw(metadata(key))
    auth = Authenticator(coordinator["data_dir"])
    try:
        caller = auth.authenticate(METHOD, entries)
    except Unauthenticated:
        return
    # Only d1's key exists on this side: nothing else can produce a valid signature.
    assert caller == Caller("d1")
    assert (METADATA_DEVICE, "d1") in entries
    # and the same call again is a replay
    with pytest.raises(Unauthenticated, match="replays"):
        auth.authenticate(METHOD, entries)


# ------------------------------------------------------------------ the device's side
def _models() -> st.SearchStrategy[Any]:
    files = st.lists(
        st.builds(
            model_pb.ModelFile,
            path=st.sampled_from(PATHS) | TEXT,
            size_bytes=st.integers(0, 2**64 - 1),
            sha256=TEXT,
        ),
        max_size=3,
    )
    quality = st.builds(
        model_pb.Quality,
        kl=st.none() | st.floats(),
        top1_agreement=st.none() | st.floats(),
        reference=TEXT,
    )
    return st.builds(
        model_pb.Model,
        version=TEXT,
        run=TEXT,
        name=TEXT,
        size_bytes=st.integers(0, 2**64 - 1),
        files=files,
        quality=quality,
    )


@FAST
@given(data=wire(st.builds(model_pb.ListModelsResponse, models=st.lists(_models(), max_size=3))))
def test_model_listings_convert_or_fail_to_parse(data):
    response = parse(model_pb.ListModelsResponse, data)
    if response is None:
        return
    models = [RemoteModel.from_proto(m) for m in response.models]
    for remote, m in zip(models, response.models, strict=True):
        assert remote.version == m.version and len(remote.files) == len(m.files)
        assert set(remote.quality) <= {"kl", "top1_agreement", "perplexity"}


BUDGETS = st.builds(
    privacy_pb.GetBudgetResponse,
    device_id=TEXT,
    epsilon_spent=st.floats(),
    epsilon_remaining=st.floats(),
    rounds_trained=st.integers(0, 2**32 - 1),
    runs=st.lists(TEXT, max_size=3),
)


@FAST
@given(data=wire(BUDGETS))
def test_budget_answers_convert_or_fail_to_parse(data):
    response = parse(privacy_pb.GetBudgetResponse, data)
    if response is None:
        return
    budget = Budget.from_proto(response)
    assert budget.device_id == response.device_id and budget.runs == tuple(response.runs)


@FAST
@given(data=st.binary(max_size=256))
def test_download_responses_parse_or_fail_cleanly(data):
    response = parse(model_pb.DownloadModelResponse, data)
    if response is None:
        return
    assert response.WhichOneof("part") in (None, "header", "chunk")


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(PATHS) | st.text(max_size=30))
def test_a_listed_file_path_never_leads_out_of_the_download_directory(path):
    """What the coordinator lists decides where the device writes: the client and
    ``fedlora models pull`` both refuse anything that could leave the directory."""
    root = Path("/downloads/models")
    try:
        rel = _check_relative(path)
    except ConfigError:
        rel = None
    try:
        pulled = _local_path(root, path)
    except ExportError:
        pulled = None
    assert (rel is None) == (pulled is None)  # one rule on both paths
    if rel is None or pulled is None:
        return
    dest = root.joinpath(*rel.parts)
    assert dest == pulled
    assert dest == root or root in dest.parents
    assert ".." not in PurePosixPath(path).parts and not PurePosixPath(path).is_absolute()


@pytest.mark.parametrize("path", [".", "./", ".//."])
def test_a_listed_path_that_names_the_directory_itself_is_refused(path):
    with pytest.raises(ConfigError):
        _check_relative(path)
