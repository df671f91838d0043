"""A device reports its privacy spend of the current run when the coordinator asks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from flwr.app import Context, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora import runtime
from fedlora.client.device_client import DeviceClient
from fedlora.client.ledger import save_device_ledger
from fedlora.config import FedloraConfig
from fedlora.errors import UpdateError
from fedlora.privacy import DPSGDEvent, PrivacyLedger
from fedlora.privacy.spend import EVENTS_KEY, QUERY_KEY, decode_events, encode_events


def _event(rnd: int, run: str) -> DPSGDEvent:
    return DPSGDEvent("d0", rnd, 1.5, 0.25, 4, 1e-5, run=run)


@pytest.fixture
def device(monkeypatch, tmp_path):
    data = SimpleNamespace(device="d0", train=tuple(f"r{i}" for i in range(32)), heldout=())
    monkeypatch.setattr(runtime, "device_info", lambda cfg, i: ("d0", len(data.train)))
    monkeypatch.setattr(runtime, "device_data", lambda cfg, i: data)
    ctx = Context(
        run_id=3, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )
    # Two rounds of this run, one of an earlier run (a device's ledger spans runs).
    ledger = PrivacyLedger([_event(1, "2"), _event(1, "3"), _event(2, "3")])
    save_device_ledger(ctx, ledger, tmp_path / "d0" / "ledger.json")
    return DeviceClient(FedloraConfig(), ctx, device_root=tmp_path)


def test_asked_for_its_ledger_a_device_reports_this_runs_events(device):
    props = device.get_properties({QUERY_KEY: True})

    events = decode_events(props[EVENTS_KEY], "d0", max_events=10)
    assert events == [_event(1, "3"), _event(2, "3")]
    assert props["device"] == "d0" and props["num_records"] == 32


def test_discovery_does_not_carry_the_ledger(device):
    assert EVENTS_KEY not in device.get_properties({})


def test_events_round_trip_through_their_encoding():
    events = [_event(1, "3"), _event(2, "3")]
    assert decode_events(encode_events(events), "d0", max_events=2) == events
    assert decode_events(encode_events([]), "d0", max_events=0) == []


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (None, "no ledger report"),
        ("x" * 1_000_001, "characters"),
        ("{", "not JSON"),
        ('{"a": 1}', "not a list"),
        (json.dumps([_event(1, "3").to_dict()] * 3), "at most 2"),
        (json.dumps([{"device": "d0"}]), "malformed"),
        (json.dumps([{**_event(1, "3").to_dict(), "noise_multiplier": 1}]), "malformed"),
        (json.dumps(["x"]), "malformed"),
    ],
)
def test_a_bad_report_is_refused_with_what_is_wrong(text, match):
    with pytest.raises(UpdateError, match=match):
        decode_events(text, "node 4", max_events=2)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=300), st.recursive(st.none(), lambda c: st.lists(c))))
def test_anything_decodes_or_is_refused_as_an_update_error(text):
    raw = text if isinstance(text, str) else json.dumps(text)
    try:
        events = decode_events(raw, "node 4", max_events=5)
    except UpdateError:
        return
    assert len(events) <= 5 and all(isinstance(e, DPSGDEvent) for e in events)
