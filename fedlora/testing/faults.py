"""Fault injection for the Flower simulation engine, and what a round should give.

:func:`fault_mod` is a ClientApp mod that makes chosen simulated devices drop out at a
chosen SecAgg+ stage (or plain ``fit``) of a chosen round, answer late, or send a
malformed reply. :func:`faulty_client_app` wraps the device's real ClientApp in it
from the outside, so production code has no fault hooks at all: only a test or a
benchmark that builds its ClientApp through this module can switch one on.

Faults are keyed by partition id (a simulated device's node config) and round (the
message's ``group_id``), and are fixed before the run, so the caller knows them without
talking to the engine's worker processes; :func:`random_faults` draws a seeded plan
for every device and round, of which only the sampled devices' entries fire. With
``log`` set, every fault that fires appends one JSON line to that file (from whichever
worker process ran it), so the caller can compare what it injected with what the
coordinator counted.

A malformed reply is the device's real reply, altered after the device's code ran
(so it trained, spent and recorded its event as usual): its tensors (``TENSOR_KINDS``,
plain ``fit`` only: under SecAgg+ the update is masked inside the SecAgg+ mod,
beneath this mod, and nothing outside the device can alter it unseen) or its
plaintext claims (``CLAIM_KINDS``, plain or SecAgg+'s masked-vector stage).
:data:`MALFORMED` maps each kind to the reason the coordinator gives when it rejects
it (:data:`fedlora.server.aggregate.REASONS`).

:func:`retrain_update` recomputes a device's update of one round in the caller's
process, from the σ its own ledger recorded and the same seed, as ``DeviceClient.fit``
made it: the expected aggregate is then a plain weighted mean of those updates. That
takes a run with ``privacy.reproducible_noise`` (by default a device's noise comes from
its own CSPRNG, which nobody can replay).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Parameters, bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedlora.config import FedloraConfig

#: What a fault does at its stage: raise before the device's code runs (it never trained
#: at that stage), raise after it ran (it trained, spent and recorded, but no reply
#: leaves), hold the reply back, or alter the reply (``kind``, see :data:`MALFORMED`).
ACTIONS = ("crash_before", "crash_after", "delay", "malformed")

#: The SecAgg+ stages, in protocol order; a plain training request's stage is ``fit``.
SECAGG_STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")
MASKED_STAGE = "collect_masked_vectors"

#: Malformed tensors → the coordinator's rejection reason (plain ``fit`` replies only).
TENSOR_KINDS = {
    "nan": "non_finite",  # one value of the first tensor is NaN
    "shape": "shape",  # the first tensor flattened, one value longer
    "extra_tensor": "tensor_count",  # one tensor more than the adapter has
    "out_of_range": "out_of_range",  # one value far outside any clipping range
    "dtype": "dtype",  # the first tensor as float64
}
#: Lies in the plaintext claims → the coordinator's rejection reason.
CLAIM_KINDS = {
    "round": "round",  # claims a later round
    "device": "device",  # claims another device id than it gave at discovery
    "num_examples": "num_examples",  # claims far more records than it has
    "sample_rate": "privacy_event",  # reports half its real DP-SGD sampling rate
}
MALFORMED = {**TENSOR_KINDS, **CLAIM_KINDS}
_FAR_OUT = 1e30  # beyond any secagg.clipping_range, still a finite float32


class InjectedFault(RuntimeError):
    """A dropout the test asked for; the engine turns it into an error reply."""


@dataclass(frozen=True)
class Fault:
    """Device ``partition`` misbehaves at ``stage`` of ``round``.

    ``stage``: a SecAgg+ stage (:data:`SECAGG_STAGES`) or ``fit`` for a plain training
    request. ``delay``: the reply is held ``delay_s`` seconds, or until the file
    ``release`` exists, whichever comes first. ``malformed``: the reply is altered as
    ``kind`` says (:data:`MALFORMED`); a claim can be altered in ``fit`` or SecAgg+'s
    masked-vector stage, tensors only in ``fit``.
    """

    partition: int
    round: int
    stage: str
    action: str
    delay_s: float = 0.0
    release: str | None = None
    kind: str | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}")
        if self.stage not in (*SECAGG_STAGES, "fit"):
            raise ValueError(f"unknown stage {self.stage!r}")
        if (self.action == "malformed") != (self.kind is not None):
            raise ValueError("a malformed fault needs a kind, and only a malformed one has one")
        if self.kind is None:
            return
        if self.kind not in MALFORMED:
            raise ValueError(f"unknown malformed kind {self.kind!r}: one of {sorted(MALFORMED)}")
        allowed = ("fit",) if self.kind in TENSOR_KINDS else ("fit", MASKED_STAGE)
        if self.stage not in allowed:
            raise ValueError(
                f"a {self.kind!r} reply can be sent only at {' or '.join(allowed)}: under "
                "SecAgg+ the update is masked beneath this mod"
            )

    @property
    def reason(self) -> str | None:
        """The coordinator's rejection reason for this fault's reply (malformed only)."""
        return MALFORMED[self.kind] if self.kind is not None else None


def message_stage(msg: Message) -> str:
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is not None and Key.STAGE in configs:
        return str(configs[Key.STAGE])
    if msg.metadata.message_type == MessageType.TRAIN:
        return "fit"
    return msg.metadata.message_type


def malform(reply: Message, kind: str) -> None:
    """Alter a training reply in place as ``kind`` says (see :data:`MALFORMED`)."""
    content = reply.content
    if kind in CLAIM_KINDS:
        metrics = content.config_records["fitres.metrics"]
        rnd, q = metrics.get("round"), metrics.get("sample_rate")
        if kind == "round":
            metrics["round"] = (rnd if isinstance(rnd, int) else 0) + 1000
        elif kind == "device":
            metrics["device"] = str(metrics["device"]) + "-impostor"
        elif kind == "sample_rate":
            metrics["sample_rate"] = (q if isinstance(q, float) else 1.0) / 2
        else:
            content.metric_records["fitres.num_examples"]["num_examples"] = 10**9
        return
    key = "fitres.parameters"
    params = compat.arrayrecord_to_parameters(content.array_records[key], keep_input=True)
    arrays = [bytes_to_ndarray(t) for t in params.tensors]
    first = arrays[0].copy()
    if kind == "nan":
        first.flat[0] = np.nan
    elif kind == "out_of_range":
        first.flat[0] = _FAR_OUT
    elif kind == "shape":
        first = np.append(first.ravel(), np.float32(0))
    elif kind == "dtype":
        first = first.astype(np.float64)
    tensors = [ndarray_to_bytes(a) for a in [first, *arrays[1:]]]
    if kind == "extra_tensor":
        tensors.append(ndarray_to_bytes(arrays[0]))
    content.array_records[key] = compat.parameters_to_arrayrecord(
        Parameters(tensors=tensors, tensor_type=params.tensor_type), keep_input=True
    )


def fault_mod(faults: Sequence[Fault], log: str | Path | None = None) -> Mod:
    """The outermost mod of a faulty device: applies the fault for its message, if any.

    At most one fault per (partition, round, stage) is used (the first given). With
    ``log``, each fault that fires appends ``{"partition", "round", "stage", "action",
    "kind", "applied"}`` as one JSON line; ``applied`` is false for a malformed fault
    whose device answered with an error (it declined), so nothing was altered.
    """
    plan: dict[tuple[int, int, str], Fault] = {}
    for f in faults:
        plan.setdefault((f.partition, f.round, f.stage), f)
    log_path = None if log is None else str(log)

    def note(fault: Fault, applied: bool = True) -> None:
        if log_path is None:
            return
        line = json.dumps(
            {
                "partition": fault.partition,
                "round": fault.round,
                "stage": fault.stage,
                "action": fault.action,
                "kind": fault.kind,
                "applied": applied,
            }
        )
        # One short O_APPEND write per line: whole lines, whichever worker writes.
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        pid = ctxt.node_config.get("partition-id")
        group = msg.metadata.group_id
        rnd = int(group) if group.isdigit() else None
        stage = message_stage(msg)  # read before the SecAgg+ mod pops the stage key
        fault = plan.get((pid, rnd, stage)) if isinstance(pid, int) and rnd is not None else None
        if fault is None:
            return call_next(msg, ctxt)
        where = f"device {pid}, round {rnd}, stage {stage}"
        if fault.action == "crash_before":
            note(fault)
            raise InjectedFault(f"injected dropout before {where}")
        reply = call_next(msg, ctxt)
        if fault.action == "crash_after":
            note(fault)
            raise InjectedFault(f"injected dropout after {where}")
        if fault.action == "malformed":
            applied = not reply.has_error() and fault.kind is not None
            if applied and fault.kind is not None:
                malform(reply, fault.kind)
            note(fault, applied)
            return reply
        note(fault)
        deadline = time.monotonic() + fault.delay_s
        while time.monotonic() < deadline:
            if fault.release is not None and os.path.exists(fault.release):
                break
            time.sleep(0.1)
        return reply

    return mod


def random_faults(
    partitions: int,
    rounds: int,
    *,
    dropout_rate: float,
    malformed_rate: float,
    secagg: bool,
    seed: int,
    kinds: Sequence[str] | None = None,
) -> list[Fault]:
    """A seeded plan: each (partition, round) independently drops out with
    ``dropout_rate`` (at a uniformly drawn stage, before or after the device's code
    ran) or else sends a malformed reply with ``malformed_rate`` (a uniformly drawn
    ``kind``; default: every kind the mode allows). Only sampled devices' entries fire,
    so among the devices a round samples the rates hold in expectation.
    """
    if min(dropout_rate, malformed_rate) < 0 or dropout_rate + malformed_rate > 1:
        raise ValueError("fault rates must be ≥ 0 and sum to at most 1")
    stages = SECAGG_STAGES if secagg else ("fit",)
    allowed = tuple(CLAIM_KINDS) if secagg else tuple(MALFORMED)
    chosen = tuple(allowed if kinds is None else kinds)
    if not chosen or any(k not in allowed for k in chosen):
        raise ValueError(f"malformed kinds must be among {allowed} in this mode, got {chosen}")
    bad_stage = MASKED_STAGE if secagg else "fit"
    rng = np.random.default_rng(seed)
    plan = []
    for rnd in range(1, rounds + 1):
        for pid in range(partitions):
            u, which, action = rng.random(), rng.integers(1 << 30), rng.integers(2)
            if u < dropout_rate:
                stage = stages[int(which) % len(stages)]
                act = ("crash_before", "crash_after")[int(action)]
                plan.append(Fault(partition=pid, round=rnd, stage=stage, action=act))
            elif u < dropout_rate + malformed_rate:
                kind = chosen[int(which) % len(chosen)]
                plan.append(
                    Fault(partition=pid, round=rnd, stage=bad_stage, action="malformed", kind=kind)
                )
    return plan


class _ModdedClientApp(ClientApp):
    """``inner`` with one more mod around it, outside its own mods (SecAgg+ included)."""

    def __init__(self, inner: ClientApp, mod: Mod) -> None:
        super().__init__()
        self._inner = inner
        self._outer_mod = mod

    def __call__(self, message: Message, context: Context) -> Message:
        return self._outer_mod(message, context, self._inner)


def faulty_client_app(
    cfg: FedloraConfig,
    device_root: Path,
    faults: Sequence[Fault],
    log: str | Path | None = None,
) -> ClientApp:
    from fedlora.client.app import make_client_app

    return _ModdedClientApp(
        make_client_app(cfg, device_root=device_root), fault_mod(faults, log=log)
    )


def run_with_faults(
    cfg: FedloraConfig,
    run_dir: Path,
    faults: Sequence[Fault],
    observer: Any = None,
    log: str | Path | None = None,
) -> Any:
    """One simulated run of ``cfg`` on the embedded fleet with ``faults``; the Coordinator.

    ``log``: where fired faults are written (see :func:`fault_mod`)."""
    from flwr.simulation import run_simulation

    from fedlora import runtime
    from fedlora.server.app import make_server_app
    from fedlora.simulate import quiet_libraries

    quiet_libraries()
    run_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    run_simulation(
        server_app=make_server_app(cfg, run_dir, observer=observer, result=result),
        client_app=faulty_client_app(cfg, run_dir / "devices", faults, log=log),
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
    from fedlora.privacy import PrivacyLedger

    return {
        p.parent.name: PrivacyLedger.load(p)
        for p in sorted((run_dir / "devices").glob("*/ledger.json"))
    }


def checkpoint(cfg: FedloraConfig, run_dir: Path, rnd: int) -> list[np.ndarray]:
    from fedlora import runtime
    from fedlora.server.checkpoint import load_checkpoint

    names = runtime.model_bundle(cfg).names
    return load_checkpoint(run_dir / "checkpoints" / f"round-{rnd:04d}.safetensors", names)


def retrain_update(
    cfg: FedloraConfig,
    partition: int,
    rnd: int,
    sigma: float | None,
    previous: list[np.ndarray],
) -> tuple[list[np.ndarray], int]:
    """Device ``partition``'s update of round ``rnd`` from ``previous``, as it made it
    (``sigma`` None: it trained without DP-SGD, as under device-level DP alone)."""
    import torch

    from fedlora import runtime
    from fedlora.adapter import get_adapter_arrays, set_adapter_arrays
    from fedlora.client.device_client import _seed, clip_update_norm, round_randomness
    from fedlora.client.train import LocalTrainingPlan, train_lora
    from fedlora.errors import ConfigError

    if not cfg.privacy.reproducible_noise:
        raise ConfigError(
            "retrain_update replays a device's DP noise: run with privacy.reproducible_noise"
        )

    torch.set_num_threads(1)  # as each simulated device trains
    bundle = runtime.model_bundle(cfg)
    data = runtime.fleet(cfg).devices[partition]
    ids, mask = runtime.encoded(cfg, f"device:{data.device}", data.train)
    plan = LocalTrainingPlan(
        steps=cfg.training.local_steps,
        expected_batch_size=cfg.training.batch_size,
        learning_rate=cfg.learning_rate,
        max_grad_norm=cfg.privacy.max_grad_norm,
        noise_multiplier=sigma,
        seed=_seed(cfg.seed, partition, rnd),
        randomness=None if sigma is None else round_randomness(cfg, partition, rnd, deployed=False),
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
    from fedlora.server.aggregate import apply_update, weighted_mean

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


# ------------------------------------------------------------------ noise switched off


class _ZeroNoise:
    """A device's randomness with the Gaussian noise taken out (Poisson batches unchanged)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.source = inner.source
        self.reproducible = inner.reproducible

    def uniform(self, n: int) -> np.ndarray:
        return self._inner.uniform(n)

    def bernoulli(self, p: float, n: int) -> np.ndarray:
        return self._inner.bernoulli(p, n)

    def gaussian(self, n: int, std: float) -> np.ndarray:
        return np.zeros(n, dtype=np.float64)


def noiseless_mod() -> Mod:
    """A ClientApp mod under which DP-SGD adds no noise, while the device still calibrates
    σ, clips, and records the ε it believes it spent: a broken mechanism whose claim is
    false. For the privacy audit's power test only (``fedlora.audit.run_audit``'s
    ``client_mods``); it patches the device class inside the worker for one message."""

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        from fedlora.client.device_client import DeviceClient

        original = DeviceClient.randomness

        def silent(self: Any, server_round: int) -> Any:
            return _ZeroNoise(original(self, server_round))

        DeviceClient.randomness = silent  # type: ignore[method-assign]
        try:
            return call_next(msg, ctxt)
        finally:
            DeviceClient.randomness = original  # type: ignore[method-assign]

    return mod
