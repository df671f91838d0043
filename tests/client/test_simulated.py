"""The simulated fleet's mod: a device drops out where its seeded draw says (before or
after its own code runs), a slow device holds its reply back, and a real device (one
with its own data) is never touched."""

from __future__ import annotations

from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedlora import fleetsim, runtime
from fedlora.client.simulated import FIT_METRICS_RECORD, SimulatedDropout, simulated_fleet_mod
from fedlora.config import FedloraConfig
from tests.server.fakes import task_identity

__all__ = ["task_identity"]  # the fixture, used by name

pytestmark = pytest.mark.usefixtures("task_identity")


def config(**profile: Any) -> FedloraConfig:
    return FedloraConfig().replace(
        fleet={"profiles": [{"name": "p", "share": 1.0, **profile}]},
    )


def context(pid: int, **node: Any) -> Context:
    return Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": pid, **node},
        state=RecordDict(),
        run_config={},
    )


def message(stage: str | None, rnd: int = 1) -> Message:
    content = RecordDict()
    if stage is not None:
        content[RECORD_KEY_CONFIGS] = ConfigRecord({Key.STAGE: stage})
    return Message(content, dst_node_id=5, message_type=MessageType.TRAIN, group_id=str(rnd))


class Device:
    """The inner app: counts calls, answers with training metrics."""

    def __init__(self, train_s: float = 0.05) -> None:
        self.calls = 0
        self.train_s = train_s

    def __call__(self, msg: Message, ctxt: Context) -> Message:
        self.calls += 1
        content = RecordDict({FIT_METRICS_RECORD: ConfigRecord({"train_s": self.train_s})})
        return Message(content, reply_to=msg)


def find(cfg: FedloraConfig, point: tuple[str, str]) -> tuple[int, int]:
    """A (partition, round) whose drawn drop point is ``point``."""
    devices = runtime.fleet(cfg).devices
    for rnd in range(1, 50):
        for pid, data in enumerate(devices):
            got = fleetsim.drop_point(cfg.fleet, cfg.seed, data.device, rnd, secagg=True)
            if got == point:
                return pid, rnd
    raise AssertionError(f"no device drops at {point}")


@pytest.mark.parametrize("point", fleetsim.SECAGG_DROP_POINTS)
def test_a_device_drops_out_where_its_draw_says(point):
    cfg = config(dropout=0.5)
    pid, rnd = find(cfg, point)
    mod = simulated_fleet_mod(cfg)
    stage, when = point

    inner = Device()
    with pytest.raises(SimulatedDropout, match=f"round {rnd}"):
        mod(message(stage, rnd), context(pid), inner)
    assert inner.calls == (1 if when == "after" else 0)  # "after": it ran, then vanished
    other = next(s for s, _ in fleetsim.SECAGG_DROP_POINTS if s != stage)
    assert mod(message(other, rnd), context(pid), inner).has_content()  # other stages go on


def test_a_slow_device_holds_its_reply_back_and_says_how_long():
    cfg = config(speed=0.5)
    mod = simulated_fleet_mod(cfg)

    reply = mod(message("collect_masked_vectors"), context(0), Device(train_s=0.05))

    metrics = reply.content.config_records[FIT_METRICS_RECORD]
    assert metrics["simulated_delay_s"] == pytest.approx(0.05)
    assert metrics["train_s"] == 0.05  # the compute it measured is left as it was


def test_a_real_device_and_a_fleet_without_profiles_are_left_alone():
    always = config(dropout=1.0, speed=0.1)
    inner = Device()
    real = context(0, **{"data-path": "/data/me.jsonl"})
    reply = simulated_fleet_mod(always)(message("setup"), real, inner)
    assert inner.calls == 1 and FIT_METRICS_RECORD in reply.content.config_records
    assert "simulated_delay_s" not in reply.content.config_records[FIT_METRICS_RECORD]

    plain = simulated_fleet_mod(FedloraConfig())
    assert plain(message("setup"), context(0), inner).has_content()
    assert inner.calls == 2


def test_a_simulated_device_reports_its_profile_and_budget_without_reading_its_data():
    from fedlora.client.device_client import DeviceClient

    runtime.clear()
    cfg = FedloraConfig().replace(
        fleet={"profiles": [{"name": "phone", "share": 1.0, "budget_epsilon": 3.0}]}
    )
    client = DeviceClient(cfg, context(4))

    props = client.get_properties({})

    assert props["profile"] == "phone" and props["budget_epsilon"] == 3.0
    assert props["secagg_protocol"] == 1  # fedlora's SecAgg+ v1 (fedlora.secagg.version)
    assert (props["device"], props["num_records"]) == runtime.device_info(cfg, 4)
    assert client._data is None and not runtime._fleets  # nothing read to say so
    assert props["num_records"] == len(client.data.train)
    without = DeviceClient(FedloraConfig(), context(4))  # a fleet without profiles
    assert "profile" not in without.get_properties({})
    runtime.clear()
