"""RunService: only the operator key starts or stops runs; bad requests are refused before the
SuperLink is asked anything (tests/e2e/test_deployment.py runs it against a real SuperLink)."""

from __future__ import annotations

import json

import pytest

from fedlora.auditlog import read_events
from fedlora.cli.run import RunServiceClient
from fedlora.client.service_client import ServiceCallError
from fedlora.config import FedloraConfig
from tests.service.conftest import running

#: No SuperLink listens here: a call that got past the checks would fail as UNAVAILABLE.
NO_SUPERLINK = "127.0.0.1:1"


@pytest.fixture
def run_server(coordinator):
    with running(coordinator.data_dir, control=NO_SUPERLINK) as srv:
        yield srv


def _client(srv, coordinator, who: str = "operator") -> RunServiceClient:
    return RunServiceClient(srv.address, coordinator.ca, coordinator.key(who), caller=who)


@pytest.mark.parametrize("who", ["d1", "d2"])
def test_a_registered_device_cannot_start_list_or_stop_runs(run_server, coordinator, who):
    with _client(run_server, coordinator, who) as client:
        for call in (
            lambda: client.start("x", FedloraConfig()),
            lambda: client.resume("x"),
            lambda: client.stop(1),
            client.list,
        ):
            with pytest.raises(ServiceCallError, match="operator key") as err:
                call()
            assert err.value.code.name == "PERMISSION_DENIED"
    assert not [e for e in read_events(coordinator.data_dir) if e["action"].startswith("run.")]


def test_a_key_that_is_not_the_operators_cannot_sign_as_the_operator(run_server, coordinator):
    forged = RunServiceClient(run_server.address, coordinator.ca, coordinator.key("stranger"))
    with forged, pytest.raises(ServiceCallError, match="signature") as err:
        forged.start("x", FedloraConfig())
    assert err.value.code.name == "UNAUTHENTICATED"


def test_the_operators_bad_requests_are_refused_in_one_line(run_server, coordinator):
    with _client(run_server, coordinator) as client:
        with pytest.raises(ServiceCallError, match="run name") as err:
            client.start("../escape", FedloraConfig())
        assert err.value.code.name == "INVALID_ARGUMENT"
        stub, method = client._runs.StartRun, "/fedlora.v1.RunService/StartRun"
        from fedlora.v1 import run_service_pb2 as pb

        bad = {"training": {"rounds": 0}}
        for text in ("not json", json.dumps(bad), json.dumps({"nope": 1})):
            with pytest.raises(ServiceCallError, match="config is invalid"):
                client._unary(stub, method, pb.StartRunRequest(name="ok", config_json=text))
        # A well-formed request gets as far as the SuperLink (none here): UNAVAILABLE-ish.
        with pytest.raises(ServiceCallError, match="SuperLink") as err:
            client.start("ok", FedloraConfig())
    assert not [e for e in read_events(coordinator.data_dir) if e["action"].startswith("run.")]


def test_no_run_service_without_a_superlink(server, coordinator):
    """The plain service (no ``control``) does not serve RunService at all."""
    with _client(server, coordinator) as client, pytest.raises(ServiceCallError) as err:
        client.list()
    assert err.value.code.name == "UNIMPLEMENTED"


def test_a_broken_audit_log_refuses_a_start_before_the_superlink_is_asked(run_server, coordinator):
    """Fail closed: an action the audit log cannot record is not taken."""
    from fedlora.auditlog import AUDIT_LOG

    log = coordinator.data_dir / AUDIT_LOG
    lines = log.read_text().splitlines(keepends=True)
    assert len(lines) >= 2  # the fixture registered d1 and d2
    log.write_text("".join(lines[1:]))  # the first line removed: the chain is broken
    with _client(run_server, coordinator) as client:
        with pytest.raises(ServiceCallError, match="audit log") as err:
            client.start("ok", FedloraConfig())
        assert err.value.code.name == "FAILED_PRECONDITION"
        # ... where an intact log would have let it reach the (absent) SuperLink.
        log.write_text("".join(lines))
        with pytest.raises(ServiceCallError, match="SuperLink"):
            client.start("ok", FedloraConfig())


def test_a_run_name_is_used_once(run_server, coordinator):
    """A second StartRun of a name (a replay after a restart emptied the nonce memory
    included) is refused: it cannot start a run twice."""
    with _client(run_server, coordinator) as client:
        with pytest.raises(ServiceCallError, match="exists") as err:
            client.start("run-a", FedloraConfig())  # the fixture's run-a directory
        assert err.value.code.name == "ALREADY_EXISTS"
