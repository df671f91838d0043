"""Pure functions on adapter updates: validation and weighted averaging.

Kept free of Flower and torch so that they can be tested against hand-computed
values and reused by the deployment coordinator.

Every refusal is an :class:`UpdateRejected` whose ``reason`` is one of
:data:`REASONS`; the strategy counts them per reason in the round's metrics.
Oversized messages are refused by gRPC's message-size limit before they reach
Python; anything that gets through and does not have exactly the adapter's
tensor count, shapes and dtype is refused here before its values are read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedlora import fleetsim
from fedlora.config import FedloraConfig
from fedlora.errors import PrivacyError, UpdateError
from fedlora.privacy import DPSGDEvent, epsilon_for

#: Why an update is refused (the keys of a round's ``rejected_by_reason``).
REASONS = (
    "decode",  # the tensors are not numpy arrays the coordinator can read
    "tensor_count",  # not one tensor per adapter tensor: another LoRA config or base model
    "shape",
    "dtype",
    "non_finite",
    "out_of_range",  # a value outside ±secagg.clipping_range
    "norm",  # L2 norm above privacy.max_update_norm
    "metrics",  # device id, round, run or dp missing or of the wrong type
    "device",  # the node said it was another device at discovery
    "round",  # an update for another round
    "run",  # an update for another run
    "num_examples",  # ≤ 0, or more records than the device reported at discovery
    "privacy_event",  # its DP-SGD event is incomplete, invalid, a replay, or missing
    "masked_vector",  # SecAgg+: its masked payload is not the size (or range) it must be
    "lora_rank",  # FFA: a rank other than its tier's, or values in columns it does not train
)

#: Room for float32 rounding when a device scales its update to exactly the bound.
NORM_RTOL = 1e-5


class UpdateRejected(UpdateError):
    """An update refused before aggregation; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(message)
        self.reason = reason


def l2_norm(arrays: Sequence[np.ndarray]) -> float:
    """The L2 norm of all tensors together, accumulated in float64 (inf if it overflows)."""
    with np.errstate(over="ignore", invalid="ignore"):
        total = sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)
    return math.sqrt(total) if math.isfinite(total) else math.inf


def validate_update(
    arrays: Sequence[Any],
    shapes: Sequence[tuple[int, ...]],
    who: str = "update",
    *,
    dtype: type[np.floating[Any]] = np.float32,
    max_abs: float | None = None,
    max_norm: float | None = None,
) -> None:
    """Raise :class:`UpdateRejected` unless ``arrays`` is a sound update of the adapter.

    Sound: exactly ``shapes`` (count, then each shape), each a plain numpy array of
    ``dtype`` (float32 from a device; SecAgg+ hands the coordinator a float64
    aggregate), every value finite and within ``±max_abs``, and the L2 norm of all
    tensors together at most ``max_norm`` (with :data:`NORM_RTOL` for rounding).
    Shapes are checked before any value is read, so the work is bounded by the
    adapter's size whatever was sent.
    """
    if len(arrays) != len(shapes):
        raise UpdateRejected(
            "tensor_count",
            f"{who} has {len(arrays)} tensors, the global adapter has {len(shapes)}: "
            "it was trained with a different LoRA config or base model",
        )
    want = np.dtype(dtype)
    for i, (a, shape) in enumerate(zip(arrays, shapes, strict=True)):
        if type(a) is not np.ndarray:  # subclasses (masked arrays) could hide values
            raise UpdateRejected(
                "dtype", f"{who}: tensor {i} is a {type(a).__name__}, not a numpy array"
            )
        if a.shape != tuple(shape):
            raise UpdateRejected(
                "shape", f"{who}: tensor {i} has shape {a.shape}, expected {tuple(shape)}"
            )
        if a.dtype != want:
            raise UpdateRejected("dtype", f"{who}: tensor {i} has dtype {a.dtype}, expected {want}")
    for i, a in enumerate(arrays):
        if not np.isfinite(a).all():
            raise UpdateRejected("non_finite", f"{who}: tensor {i} contains NaN or Inf")
        if max_abs is not None and a.size and float(np.max(np.abs(a))) > max_abs:
            raise UpdateRejected(
                "out_of_range",
                f"{who}: tensor {i} has a value of magnitude {float(np.max(np.abs(a))):.4g}, "
                f"outside the clipping range ±{max_abs:g}",
            )
    if max_norm is not None:
        norm = l2_norm(arrays)
        if norm > max_norm * (1 + NORM_RTOL):
            raise UpdateRejected(
                "norm", f"{who} has L2 norm {norm:.6g}, above the bound {max_norm:g}"
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_claims(
    metrics: Mapping[str, Any],
    who: str,
    *,
    server_round: int,
    run: str | None,
    known_device: str | None,
) -> str:
    """The device id of an update whose plaintext metrics are well formed and current.

    Refuses: ``device`` not a non-empty string, ``round`` not an int, ``run`` not a
    string, ``dp`` not a bool ("metrics"); a round other than ``server_round``
    ("round"); a run other than ``run`` when the coordinator knows it ("run"); a device
    id other than the one the node gave at discovery, ``known_device`` ("device").
    A node unknown at discovery (a device that restarted under a new node id) may
    claim any id: Flower's node id is not bound to a device id without node auth.
    """
    if not isinstance(metrics, Mapping):
        raise UpdateRejected("metrics", f"{who} carries no metrics")
    device, rnd, claimed_run = metrics.get("device"), metrics.get("round"), metrics.get("run")
    if not isinstance(device, str) or not device:
        raise UpdateRejected("metrics", f"{who} has no device id (metrics 'device')")
    who = f"{who} (device {device})"
    if not _is_int(rnd):
        raise UpdateRejected("metrics", f"{who}: metrics 'round' is {rnd!r}, not an integer")
    if not isinstance(claimed_run, str):
        raise UpdateRejected("metrics", f"{who}: metrics 'run' is {claimed_run!r}, not a string")
    if not isinstance(metrics.get("dp"), bool):
        raise UpdateRejected("metrics", f"{who}: metrics 'dp' is missing or not true/false")
    if rnd != server_round:
        raise UpdateRejected("round", f"{who} is for round {rnd}, this is round {server_round}")
    if run is not None and claimed_run != run:
        raise UpdateRejected("run", f"{who} is for run {claimed_run!r}, this is run {run!r}")
    if known_device is not None and device != known_device:
        raise UpdateRejected(
            "device", f"{who}: this node identified itself as device {known_device} at discovery"
        )
    return device


def validate_num_examples(num_examples: Any, who: str, *, at_most: int | None) -> int:
    """``num_examples`` if it is a positive int no larger than ``at_most`` (the device's
    record count from discovery): it is the update's weight in the mean."""
    if not _is_int(num_examples) or num_examples <= 0:
        raise UpdateRejected("num_examples", f"{who} claims {num_examples!r} examples")
    if at_most is not None and num_examples > at_most:
        raise UpdateRejected(
            "num_examples",
            f"{who} claims {num_examples} examples, more than the {at_most} it may weigh (its "
            "record count at discovery, or the largest reported for a device that missed it)",
        )
    return int(num_examples)


def validate_event(
    metrics: Mapping[str, Any],
    device: str,
    num_examples: int,
    who: str,
    *,
    steps: int,
    batch_size: int,
    delta: float,
    noise_multiplier: float | None,
    accountant: str,
    history: Sequence[DPSGDEvent],
    budget: float,
) -> DPSGDEvent:
    """The DP-SGD event an update reports, if this run's devices could have produced it.

    A device trains ``steps`` steps at q = min(1, batch_size / num_examples) with the
    run's δ (and σ, when σ is fixed), and declines a round that would take it past
    ``budget``; the coordinator's ``history`` of the device is part of the device's own.
    Anything else ("privacy_event") is refused before it reaches the ledger, where a
    value the accountant cannot evaluate (σ = 1e-9 overflows it) would break every
    later ε of the run and its report.
    """
    try:
        event = DPSGDEvent(
            device=device,
            round=metrics["round"],
            noise_multiplier=metrics["noise_multiplier"],
            sample_rate=metrics["sample_rate"],
            steps=metrics["steps"],
            delta=metrics["delta"],
            run=metrics["run"],
        )
    except (KeyError, PrivacyError) as exc:
        raise UpdateRejected("privacy_event", f"{who}: incomplete DP-SGD event: {exc}") from None
    q = min(1.0, batch_size / max(1, num_examples))
    sigma = event.noise_multiplier if noise_multiplier is None else noise_multiplier
    wrong = [
        f"{name} {got!r}, expected {want!r}"
        for name, got, want in (
            ("steps", event.steps, steps),
            ("delta", event.delta, delta),
            ("noise_multiplier", event.noise_multiplier, sigma),
        )
        if got != want
    ]
    if not math.isclose(event.sample_rate, q, rel_tol=1e-9):
        wrong.append(f"sample_rate {event.sample_rate!r}, expected {q!r} for n={num_examples}")
    if wrong:
        raise UpdateRejected("privacy_event", f"{who} reports " + "; ".join(wrong))
    try:
        eps = epsilon_for((*history, event), delta, accountant)
    except (ArithmeticError, ValueError, PrivacyError) as exc:
        raise UpdateRejected(
            "privacy_event", f"{who}: its DP-SGD event cannot be accounted ({exc})"
        ) from None
    # 1e-3: the accountant's numerical slack; a device's own check used its longer history.
    if not eps <= budget * (1 + 1e-3):
        raise UpdateRejected(
            "privacy_event",
            f"{who} reports a round that takes it to ε={eps:.4g}, past its budget {budget:g}",
        )
    return event


def secagg_error_bound(
    weights: Sequence[int], max_weight: float, clipping_range: float, quantization_range: int
) -> float:
    """The most SecAgg+ quantization can move one value of the mean of ``weights``' updates.

    Each device scales its update by ``round(w / max_weight · Q) / Q``, quantizes it
    over ±clipping_range to Q levels with stochastic rounding (off by < 1 level,
    2·clipping_range / Q), and the coordinator divides the sum by the summed
    scales: at most ``n · 2·clipping_range / Σ round(w / max_weight · Q)`` per value.
    Infinite when the scales round to 0 (the sum then cannot be unscaled).
    """
    q = quantization_range
    total = sum(round(w / max_weight * q) for w in weights)
    if total <= 0:
        return math.inf
    return len(weights) * 2 * clipping_range / total


def weighted_mean(updates: Sequence[tuple[Sequence[np.ndarray], int]]) -> list[np.ndarray]:
    """Σ_k n_k·u_k / Σ_k n_k, tensor by tensor, accumulated in float64."""
    if not updates:
        raise ValueError("weighted_mean of no updates")
    total = sum(n for _, n in updates)
    if total <= 0:
        raise UpdateError("updates carry no examples (sum of num_examples is 0)")
    acc = [np.zeros(a.shape, dtype=np.float64) for a in updates[0][0]]
    for arrays, n in updates:
        for slot, a in zip(acc, arrays, strict=True):
            slot += np.asarray(a, dtype=np.float64) * n
    return [(slot / total).astype(np.float32) for slot in acc]


def check_tier(
    cfg: FedloraConfig,
    metrics: Mapping[str, Any],
    profiles: Mapping[str, str],
    arrays: Sequence[np.ndarray],
    who: str,
) -> int:
    """The LoRA rank an accepted update was trained at: ``lora.r``, or with FFA-LoRA the
    device's tier, which the coordinator draws itself for a simulated device with a
    profile (``profiles``: device → profile name, from discovery), checked by
    :func:`validate_tier`. A device without a profile (a deployed one) trains all ``lora.r``."""
    r = cfg.lora.r
    if cfg.lora.variant != "ffa":
        return r
    device = str(metrics.get("device"))
    profile = fleetsim.profile_of(cfg.fleet, cfg.seed, device) if device in profiles else None
    return validate_tier(metrics, fleetsim.tier_rank(profile, r), arrays, who)


def validate_tier(
    metrics: Mapping[str, Any], rank: int, arrays: Sequence[np.ndarray], who: str
) -> int:
    """``rank``, the device's tier (FFA-LoRA's nested ranks), if the update says so and,
    when its tensors are at hand (plain aggregation), has only zeros in every ``lora_B``
    column from ``rank`` on; otherwise :class:`UpdateRejected` ("lora_rank").

    The coordinator knows the tier (from the config's profiles) and checks the plaintext
    claim against it: the claim sets how much the device's columns weigh in the mean.
    """
    claimed = metrics.get("lora_rank")
    if not _is_int(claimed) or claimed != rank:
        raise UpdateRejected(
            "lora_rank", f"{who} claims LoRA rank {claimed!r}, its tier's is {rank}"
        )
    for i, a in enumerate(arrays):
        if a.ndim == 2 and a.shape[1] > rank and np.any(a[:, rank:]):
            raise UpdateRejected(
                "lora_rank", f"{who}: tensor {i} has values in lora_B columns ≥ its rank {rank}"
            )
    return rank


def nested_column_scale(tiers: Sequence[tuple[int, int]], r_max: int) -> np.ndarray:
    """Per ``lora_B`` column j, Σ_all n ÷ Σ_{devices with rank > j} n (0 if none trained it).

    ``tiers`` holds each aggregated device's (num_examples, rank). The weighted mean of
    all updates, Σ n_i u_i ÷ Σ n_i (what plain averaging and SecAgg+ both give), has in
    column j only the devices that trained it in the numerator (the others sent zeros);
    times this factor it is their own weighted mean.
    """
    total = float(sum(n for n, _ in tiers))
    scale = np.zeros(r_max, dtype=np.float64)
    for j in range(r_max):
        trained = float(sum(n for n, r in tiers if r > j))
        scale[j] = total / trained if trained > 0 else 0.0
    return scale


def rescale_columns(mean: Sequence[np.ndarray], scale: np.ndarray) -> list[np.ndarray]:
    """Each ``lora_B`` tensor ``[out, r]`` of a mean update with column j times ``scale[j]``."""
    out = []
    for a in mean:
        if a.ndim != 2 or a.shape[1] != scale.shape[0]:
            raise UpdateError(f"a lora_B tensor has shape {a.shape}, not [*, {scale.shape[0]}]")
        out.append((a.astype(np.float64) * scale[None, :]).astype(np.float32))
    return out


def apply_update(
    global_arrays: Sequence[np.ndarray], update: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """The next global adapter: global + mean update."""
    return [
        (g.astype(np.float32) + u.astype(np.float32))
        for g, u in zip(global_arrays, update, strict=True)
    ]
