"""Simulation only: a simulated device as slow and as flaky as its profile says.

:func:`simulated_fleet_mod` is the outermost mod of a *simulated* device's ClientApp
(``fedlora simulate`` installs it when ``fleet.profiles`` is set; the deployed
``fedlora.client.app:app`` never has it, and it stands aside on any node with its own data,
which is what a deployed device is). For a training message of round r it:

- drops out where :func:`fedlora.fleetsim.drop_point` says, by raising before or after
  the device's own code runs at that stage (the engine turns the exception into an
  error reply, as a device that vanished would leave the coordinator without one);
- after training, holds the reply back (1/speed − 1) · ``train_s``: a slower device's
  simulated wall clock, not extra compute. The fit metrics gain
  ``simulated_delay_s``.

Availability is not decided here: an offline device is one the coordinator does not
sample (:meth:`fedlora.server.strategy.LoraFedAvg.configure_fit`).
"""

from __future__ import annotations

import math
import time

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedlora import fleetsim, runtime
from fedlora.config import DeviceProfile, FedloraConfig

#: The reply record holding a training reply's plaintext metrics (Flower's legacy layout),
#: with or without SecAgg+.
FIT_METRICS_RECORD = "fitres.metrics"


class SimulatedDropout(RuntimeError):
    """A simulated device left the round, as its profile's ``dropout`` drew it."""


def message_stage(msg: Message) -> str:
    """The SecAgg+ stage of a training message, ``fit`` for a plain one."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is not None and isinstance(configs.get(Key.STAGE), str):
        return str(configs[Key.STAGE])
    return "fit"


def simulated_fleet_mod(cfg: FedloraConfig) -> Mod:
    """Dropouts and slowness of the simulated fleet's profiles (a no-op without profiles)."""
    fleet, seed, secagg = cfg.fleet, cfg.seed, cfg.secagg.enabled

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        pid = ctxt.node_config.get("partition-id")
        group = msg.metadata.group_id
        if (
            not fleet.profiles
            or ctxt.node_config.get("data-path")  # a device with its own data is real
            or pid is None
            or msg.metadata.message_type != MessageType.TRAIN
            or not group.isdigit()  # legacy workflows send the round as the group id
        ):
            return call_next(msg, ctxt)
        device, _ = runtime.device_info(cfg, int(pid))
        rnd = int(group)
        stage = message_stage(msg)  # before secaggplus_mod pops the stage key
        point = fleetsim.drop_point(fleet, seed, device, rnd, secagg=secagg)
        if point == (stage, "before"):
            raise SimulatedDropout(
                f"simulated device {device} dropped out of round {rnd} at {stage}"
            )
        reply = call_next(msg, ctxt)
        if point == (stage, "after"):
            raise SimulatedDropout(
                f"simulated device {device} dropped out of round {rnd} after {stage}"
            )
        _slow_down(reply, fleetsim.profile_of(fleet, seed, device))
        return reply

    return mod


def _slow_down(reply: Message, profile: DeviceProfile | None) -> None:
    """Hold a training reply back as long as a device of ``profile`` would take longer."""
    if reply.has_error():
        return
    metrics = reply.content.config_records.get(FIT_METRICS_RECORD)
    if metrics is None:
        return
    train_s = metrics.get("train_s")
    if not isinstance(train_s, float) or not math.isfinite(train_s):
        return
    delay = fleetsim.simulated_delay_s(profile, train_s)
    if delay > 0:
        time.sleep(delay)
    metrics["simulated_delay_s"] = delay
