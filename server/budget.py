"""The coordinator's view of every device's privacy budget.

The coordinator keeps its own ledger, built from the DP-SGD events devices
report with their updates (metrics travel in plaintext beside SecAgg+), and
uses it to decide who may be sampled: a device whose next round would take it
past its budget is not asked. The device checks again on its side (and its
ledger is the authority); the two ledgers are compared in tests.

It also tracks what it is *owed*: every training request sent whose spend it has
not learned yet. A reply, a decline or the device's own ledger report settles it
(:mod:`fedlora.server.reconcile`), so that a device that trained and then dropped out,
or answered after the deadline, is in this ledger all the same.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedlora.config import PrivacySection
from fedlora.errors import UpdateError
from fedlora.privacy import DDGEvent, DPSGDEvent, PrivacyLedger, epsilon_for, epsilon_for_device
from fedlora.privacy.events import poisson_sample_rate

#: How a device's budget refusal reads (see ``fedlora.client.device_client.plan_noise``).
DECLINE_PATTERN = re.compile(r"device (\S+) declines round (\d+)")


class FleetBudget:
    def __init__(
        self,
        privacy: PrivacySection,
        ledger: PrivacyLedger | None = None,
        *,
        steps_per_round: int = 1,
        batch_size: int = 1,
    ) -> None:
        self.privacy = privacy
        self.ledger = ledger if ledger is not None else PrivacyLedger()
        self.steps_per_round = steps_per_round
        self.batch_size = batch_size
        self.node_device: dict[int, str] = {}
        self.num_records: dict[str, int] = {}
        self.budgets: dict[str, float] = {}
        self.declined: set[str] = set()
        #: Device → the simulated profile it reported at discovery (simulation only; a
        #: deployed device reports none). The sampler draws such a device's availability.
        self.profiles: dict[str, str] = {}
        #: Node id → rounds it was sent a training request in whose privacy spend this
        #: ledger has not learned yet: not from its training reply, not from a decline,
        #: not from its own ledger (:mod:`fedlora.server.reconcile` asks for those).
        self.owed: dict[int, set[int]] = {}
        self._eps_cache: dict[str, tuple[int, float]] = {}
        #: "Does one more round fit?" by what decides it (the spend's parameters, not whose
        #: it is): a fleet of thousands has far fewer distinct histories than devices.
        self._fits_cache: dict[tuple[Any, ...], bool] = {}
        #: Device-level DP: the event one more round would add for a device (set by the
        #: strategy from its plan, :meth:`fedlora.server.ddp.DeviceLevelDP.event`).
        self.next_device_event: Callable[[str], DDGEvent] | None = None

    def register(self, node_id: int, props: Mapping[str, Any]) -> None:
        """What a device said about itself at discovery: its id and how many records it has."""
        device = str(props["device"])
        self.node_device[node_id] = device
        n = props.get("num_records")
        if isinstance(n, int) and n > 0:
            self.num_records[device] = n
        own = props.get("budget_epsilon")
        if isinstance(own, (int, float)) and 0 < own < self.privacy.epsilon:
            self.budgets[device] = float(own)
        profile = props.get("profile")
        if isinstance(profile, str) and profile:
            self.profiles[device] = profile

    def budget(self, device: str) -> float:
        """The device's budget: the run's, or less where the device said so at discovery."""
        return self.budgets.get(device, self.privacy.epsilon)

    def devices(self) -> list[str]:
        """Every device known from discovery or the ledger, sorted."""
        return sorted(set(self.node_device.values()) | set(self.ledger.devices(unit=None)))

    def expect(self, node_id: int, server_round: int) -> None:
        """A training request went to ``node_id``: what it spends in that round is owed."""
        if self.privacy.record_level:
            self.owed.setdefault(node_id, set()).add(server_round)

    def settle(self, node_id: int, server_round: int) -> None:
        """The node's spend in ``server_round`` is known (recorded, or known to be none)."""
        rounds = self.owed.get(node_id)
        if rounds is not None:
            rounds.discard(server_round)
            if not rounds:
                del self.owed[node_id]

    def num_owed(self) -> int:
        """Training requests whose spend this ledger has not learned yet."""
        return sum(len(rounds) for rounds in self.owed.values())

    def record(self, node_id: int, metrics: Mapping[str, Any]) -> DPSGDEvent | None:
        """Add the event a device reported with its update (None when it trained without DP)."""
        device = metrics.get("device")
        if not isinstance(device, str):
            raise UpdateError(f"node {node_id} sent an update without its device id")
        self.node_device[node_id] = device
        if not metrics.get("dp"):
            rnd = metrics.get("round")
            if isinstance(rnd, int):
                self.settle(node_id, rnd)
            return None
        try:
            event = DPSGDEvent(
                device=device,
                round=int(metrics["round"]),
                noise_multiplier=float(metrics["noise_multiplier"]),
                sample_rate=float(metrics["sample_rate"]),
                steps=int(metrics["steps"]),
                delta=float(metrics["delta"]),
                run=str(metrics.get("run", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UpdateError(
                f"device {device} reported an incomplete privacy event: {exc}"
            ) from None
        self.add(node_id, event)
        return event

    def add(self, node_id: int, event: DPSGDEvent) -> None:
        """Append an event the caller has checked; that round of the node is settled."""
        self.ledger.append(event)
        self.node_device.setdefault(node_id, event.device)
        self.settle(node_id, event.round)

    def add_device_level(self, event: DDGEvent) -> None:
        """Append a device-level event (the coordinator's own: a sum it unmasked)."""
        self.ledger.append(event)

    def device_epsilon(self, device: str) -> float:
        """The device's device-level ε so far (its whole updates in the sums unmasked)."""
        events = self.ledger.events_for(device, unit="device")
        return epsilon_for_device(events, self.privacy.device.delta) if events else 0.0

    def epsilon(self, device: str) -> float:
        events = self.ledger.events_for(device, unit="record")
        hit = self._eps_cache.get(device)
        if hit is not None and hit[0] == len(events):
            return hit[1]
        eps = epsilon_for(events, self.privacy.delta, self.privacy.accountant) if events else 0.0
        self._eps_cache[device] = (len(events), eps)
        return eps

    def note_failure(self, reason: str) -> str | None:
        """Read a device's refusal out of a failed reply; the device is not asked again.

        A device that declines for its budget raises ``BudgetExhaustedError``
        ("device D declines round R: ..."), which Flower returns as the reply's
        error text. Returns the device id, or None for any other failure.
        """
        match = DECLINE_PATTERN.search(reason)
        if match is None:
            return None
        device, rnd = match.group(1), int(match.group(2))
        self.declined.add(device)
        # It did not train in that round: nothing is owed (its own ledger agrees).
        for node_id in [n for n, d in self.node_device.items() if d == device]:
            self.settle(node_id, rnd)
        return device

    def can_train_again(self, device: str) -> bool:
        """Whether one more round (like its last one) keeps the device within budget
        (both budgets, under ``privacy.unit`` "both")."""
        if not self.privacy.enabled:
            return True
        if device in self.declined:
            return False
        if self.privacy.device_level and not self._device_round_fits(device):
            return False
        if not self.privacy.record_level:
            return True
        events = self.ledger.events_for(device, unit="record")
        budget = self.budget(device)
        if self.privacy.noise_multiplier is None:
            # Calibrating devices spread the budget over the whole run; only a spent one stops.
            return self.epsilon(device) < budget * (1 - 1e-9)
        if events:
            last = events[-1]
            q, steps, rnd = last.sample_rate, last.steps, last.round + 1
        elif device in self.num_records:
            # Not trained yet: its first round costs what its data size implies.
            q = poisson_sample_rate(self.batch_size, self.num_records[device])
            steps, rnd = self.steps_per_round, 1
        else:
            return True  # nothing known yet; the device itself will decline if it must
        nxt = DPSGDEvent(
            device=device,
            round=rnd,
            noise_multiplier=self.privacy.noise_multiplier,
            sample_rate=q,
            steps=steps,
            delta=self.privacy.delta,
        )
        key = (budget, *(_spend(e) for e in (*events, nxt)))
        fits = self._fits_cache.get(key)
        if fits is None:
            eps = epsilon_for((*events, nxt), self.privacy.delta, self.privacy.accountant)
            fits = self._fits_cache[key] = eps <= budget
        return fits

    def _device_round_fits(self, device: str) -> bool:
        """Whether one more device-level round, with the fewest survivors the coordinator
        unmasks, keeps the device within ``privacy.device.epsilon``."""
        if self.next_device_event is None:
            return True
        events = self.ledger.events_for(device, unit="device")
        nxt = self.next_device_event(device)
        key = ("device", *(_device_spend(e) for e in (*events, nxt)))
        fits = self._fits_cache.get(key)
        if fits is None:
            eps = epsilon_for_device((*events, nxt), self.privacy.device.delta)
            fits = self._fits_cache[key] = eps <= self.privacy.device.epsilon * (1 + 1e-9)
        return fits

    def eligible(self, node_ids: list[int]) -> list[int]:
        """Nodes that may be sampled: unknown ones, and known devices with budget left."""
        return [
            nid
            for nid in node_ids
            if nid not in self.node_device or self.can_train_again(self.node_device[nid])
        ]

    def worst_device_epsilon(self) -> float:
        """The largest device-level ε of any device in the ledger."""
        return max(
            (self.device_epsilon(d) for d in self.ledger.devices(unit="device")), default=0.0
        )

    def worst_epsilon(self) -> float:
        return max((self.epsilon(d) for d in self.ledger.devices()), default=0.0)

    def num_exhausted(self) -> int:
        """Devices that cannot afford another round (known from discovery or the ledger)."""
        known = set(self.node_device.values()) | set(self.ledger.devices(unit=None))
        return sum(not self.can_train_again(d) for d in known)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.ledger.save(path)


def _spend(event: DPSGDEvent) -> tuple[Any, ...]:
    """What an event's privacy cost depends on (not the device, round or run)."""
    return (event.mechanism, event.noise_multiplier, event.sample_rate, event.steps, event.delta)


def _device_spend(event: DDGEvent) -> tuple[Any, ...]:
    return (
        event.noise_stddev,
        event.survivors,
        event.l2_sensitivity,
        event.dimension,
        event.delta,
    )


def finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default
