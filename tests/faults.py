"""Test-only fault injection for the Flower simulation engine, and what a round should give.

:func:`fault_mod` is a ClientApp mod that makes chosen simulated devices drop out at a
chosen SecAgg+ stage (or plain ``fit``) of a chosen round, or answer late.
:func:`faulty_client_app` wraps the device's real ClientApp in it from the outside, so
production code has no fault hooks at all: nothing outside ``tests/`` can switch one on.

Faults are keyed by partition id (a simulated device's node config) and round (the
message's ``group_id``), and are fixed before the run, so the test knows them without
talking to the engine's worker processes.

:func:`retrain_update` recomputes a device's update of one round in the test process,
from the σ its own ledger recorded and the same seed, as ``DeviceClient.fit`` made it:
the expected aggregate is then a plain weighted mean of those updates.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedlora.config import FedloraConfig

#: What a fault does at its stage: raise before the device's code runs (it never trained
#: at that stage), raise after it ran (it trained, spent and recorded, but no reply
#: leaves), or hold the reply back.
ACTIONS = ("crash_before", "crash_after", "delay")


class InjectedFault(RuntimeError):
    """A dropout the test asked for; the engine turns it into an error reply."""


@dataclass(frozen=True)
class Fault:
    """Device ``partition`` misbehaves at ``stage`` of ``round``.

    ``stage``: a SecAgg+ stage (``setup``, ``share_keys``, ``collect_masked_vectors``,
    ``unmask``) or ``fit`` for a plain training request. ``delay``: the reply is held
    ``delay_s`` seconds, or until the file ``release`` exists, whichever comes first.
    """

    partition: int
    round: int
    stage: str
    action: str
    delay_s: float = 0.0
    release: str | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}")


def message_stage(msg: Message) -> str:
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is not None and Key.STAGE in configs:
        return str(configs[Key.STAGE])
    if msg.metadata.message_type == MessageType.TRAIN:
        return "fit"
    return msg.metadata.message_type


def fault_mod(faults: Sequence[Fault]) -> Mod:
    """The outermost mod of a faulty device: applies the first fault that matches."""
    plan = tuple(faults)

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        pid = ctxt.node_config.get("partition-id")
        group = msg.metadata.group_id
        rnd = int(group) if group.isdigit() else None
        stage = message_stage(msg)  # read before secaggplus_mod pops the stage key
        fault = next(
            (f for f in plan if f.partition == pid and f.round == rnd and f.stage == stage),
            None,
        )
        if fault is None:
            return call_next(msg, ctxt)
        where = f"device {pid}, round {rnd}, stage {stage}"
        if fault.action == "crash_before":
            raise InjectedFault(f"injected dropout before {where}")
        reply = call_next(msg, ctxt)
        if fault.action == "crash_after":
            raise InjectedFault(f"injected dropout after {where}")
        deadline = time.monotonic() + fault.delay_s
        while time.monotonic() < deadline:
            if fault.release is not None and os.path.exists(fault.release):
                break
            time.sleep(0.1)
        return reply

    return mod


class _ModdedClientApp(ClientApp):
    """``inner`` with one more mod around it, outside its own mods (SecAgg+ included)."""

    def __init__(self, inner: ClientApp, mod: Mod) -> None:
        super().__init__()
        self._inner = inner
        self._outer_mod = mod

    def __call__(self, message: Message, context: Context) -> Message:
        return self._outer_mod(message, context, self._inner)


def faulty_client_app(cfg: FedloraConfig, device_root: Path, faults: Sequence[Fault]) -> ClientApp:
    from client.app import make_client_app

    return _ModdedClientApp(make_client_app(cfg, device_root=device_root), fault_mod(faults))


def run_with_faults(
    cfg: FedloraConfig,
    run_dir: Path,
    faults: Sequence[Fault],
    observer: Any = None,
) -> Any:
    """One simulated run of ``cfg`` on the embedded fleet with ``faults``; the Coordinator."""
    from flwr.simulation import run_simulation

    from fedlora import runtime
    from fedlora.simulate import quiet_libraries
    from server.app import make_server_app

    quiet_libraries()
    run_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    run_simulation(
        server_app=make_server_app(cfg, run_dir, observer=observer, result=result),
        client_app=faulty_client_app(cfg, run_dir / "devices", faults),
        num_supernodes=len(runtime.fleet(cfg).devices),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": os.cpu_count() or 1,
                "num_gpus": 0,
                "include_dashboard": False,
                "logging_level": "ERROR",
                "log_to_driver": False,
            },
        },
    )
    return result["coordinator"]


# ------------------------------------------------------------------ expected values
def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def device_ledgers(run_dir: Path) -> dict[str, Any]:
    """Device id → the ledger that simulated device kept on its own "disk"."""
    from privacy import PrivacyLedger

    return {
        p.parent.name: PrivacyLedger.load(p)
        for p in sorted((run_dir / "devices").glob("*/ledger.json"))
    }


def checkpoint(cfg: FedloraConfig, run_dir: Path, rnd: int) -> list[np.ndarray]:
    from fedlora import runtime
    from server.checkpoint import load_checkpoint

    names = runtime.model_bundle(cfg).names
    return load_checkpoint(run_dir / "checkpoints" / f"round-{rnd:04d}.safetensors", names)


def retrain_update(
    cfg: FedloraConfig, partition: int, rnd: int, sigma: float, previous: list[np.ndarray]
) -> tuple[list[np.ndarray], int]:
    """Device ``partition``'s update of round ``rnd`` from ``previous``, as it made it."""
    import torch

    from client.device_client import _seed, clip_update_norm
    from client.train import LocalTrainingPlan, train_lora
    from fedlora import runtime
    from fedlora.adapter import get_adapter_arrays, set_adapter_arrays

    torch.set_num_threads(1)  # as each simulated device trains
    bundle = runtime.model_bundle(cfg)
    data = runtime.fleet(cfg).devices[partition]
    ids, mask = runtime.encoded(cfg, f"device:{data.device}", data.train)
    plan = LocalTrainingPlan(
        steps=cfg.training.local_steps,
        expected_batch_size=cfg.training.batch_size,
        learning_rate=cfg.training.learning_rate,
        max_grad_norm=cfg.privacy.max_grad_norm,
        noise_multiplier=sigma,
        seed=_seed(cfg.seed, partition, rnd),
    )
    set_adapter_arrays(bundle.model, previous)
    train_lora(bundle.model, ids, mask, plan)
    local = get_adapter_arrays(bundle.model)
    raw = [(lo - gl).astype(np.float32) for lo, gl in zip(local, previous, strict=True)]
    update, _ = clip_update_norm(raw, cfg.privacy.max_update_norm)
    return update, int(ids.shape[0])


def expected_global(
    cfg: FedloraConfig,
    run_dir: Path,
    rnd: int,
    partitions: Sequence[int],
    previous: list[np.ndarray],
) -> tuple[list[np.ndarray], list[int]]:
    """previous + the weighted mean of ``partitions``' retrained round-``rnd`` updates,
    each with the σ its own ledger recorded; and their weights."""
    from fedlora import runtime
    from server.aggregate import apply_update, weighted_mean

    ledgers = device_ledgers(run_dir)
    fleet = runtime.fleet(cfg).devices
    updates = []
    for pid in partitions:
        device = fleet[pid].device
        (event,) = [e for e in ledgers[device].events_for(device) if e.round == rnd]
        updates.append(retrain_update(cfg, pid, rnd, event.noise_multiplier, previous))
    return apply_update(previous, weighted_mean(updates)), [n for _, n in updates]


def secagg_tolerance(cfg: FedloraConfig, weights: Sequence[int]) -> float:
    """How far SecAgg+ may move one value of the mean of updates with ``weights``:
    n · step · max_weight / Σ n_i, step = 2·clipping_range / (quantization_range − 1),
    max_weight the largest record count in the fleet (what the coordinator uses); plus
    float32 rounding of the sum."""
    from fedlora import runtime

    s = cfg.secagg
    step = 2 * s.clipping_range / (s.quantization_range - 1)
    max_weight = max(len(d.train) for d in runtime.fleet(cfg).devices)
    return len(weights) * step * max_weight / sum(weights) + 1e-6


def max_abs_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    return max(
        float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max())
        for x, y in zip(a, b, strict=True)
    )
