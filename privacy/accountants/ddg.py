"""Device-level Rényi DP accountant for the distributed discrete Gaussian (DDG).

Each of n devices adds independent discrete Gaussian noise N_Z(0, σ²) to its
clipped, rotated and rounded integer update; secure aggregation shows the
coordinator only the sum. The unit of privacy is one device's whole update,
of L2 sensitivity Δ2 and dimension d; σ and Δ2 are in integer units (after the
update was scaled to the integer grid).

RDP of one round at order α ≥ 1 (Kairouz, Liu & Steinke, ICML 2021, Proposition 14 /
Eq. 17, in the form of google-research/federated ``distributed_dp`` accounting)::

    s = Δ2 / (√n · σ)
    τ = 10 · Σ_{k=1}^{n-1} exp(-2π² σ² · k / (k + 1))     (τ = 0 when n = 1)
    ε(α) = min(α s² / 2 + τ d,  (α / 2) · (s + √d · τ)²)

τ is the slack for summing discrete Gaussians: the sum of n discrete Gaussians is
not exactly a discrete Gaussian of variance nσ², and τ bounds how far it is from
one. It is small for σ ≳ 1 (about 10(n−1)·e^{-π²σ²}) but it is bounded and
always included here, never dropped: at σ < 1 and large d it dominates.

Composition: rounds add RDP. Each event is one round in which the device's
update was in the aggregated sum, and every such round composes in full. **No
amplification by sampling is claimed**: a device cannot verify how the
coordinator sampled it, so it cannot rely on having been sampled with some
probability q; rounds it did not take part in cost it nothing (they are not in
its ledger).

Conversion to (ε, δ): the improved conversion of :mod:`.rdp`
(:func:`~fedlora.privacy.accountants.rdp.epsilon_from_rdp`), minimised over its
orders. Everything is vectorised over the orders.

:class:`DDGAccountant` does not subclass
:class:`~fedlora.privacy.accountants.base.Accountant`: that base keeps a DP-SGD
history of (σ, q, steps), types every event as a DPSGDEvent and writes DP-SGD
state; a DDG round is (σ, n, Δ2, d). The same small interface (``compose``,
``compose_many``, ``get_epsilon``, ``state_dict`` / ``load_state_dict``) is kept,
and each side refuses the other's events.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np

from fedlora.errors import PrivacyError
from fedlora.privacy.accountants.base import STATE_VERSION, check_delta, state_history
from fedlora.privacy.accountants.rdp import DEFAULT_ORDERS, FloatArray, epsilon_from_rdp
from fedlora.privacy.events import DISTRIBUTED_DISCRETE_GAUSSIAN, DDGEvent

DDGHistory = tuple[tuple[float, int, float, int, int], ...]
"""Composed rounds grouped by mechanism: ``((σ, n, Δ2, d, rounds), ...)``, sorted."""

_STATE_FIELDS = ("noise_stddev", "survivors", "l2_sensitivity", "dimension", "rounds")


def ddg_tau(noise_stddev: float, survivors: int) -> float:
    """τ = 10 · Σ_{k=1}^{n-1} exp(-2π² σ² k/(k+1)): the slack of summing n discrete Gaussians."""
    k = np.arange(1, survivors, dtype=np.float64)
    return float(10.0 * np.exp(-2.0 * math.pi**2 * noise_stddev**2 * k / (k + 1.0)).sum())


@lru_cache(maxsize=4096)
def _rdp_cached(
    noise_stddev: float,
    survivors: int,
    l2_sensitivity: float,
    dimension: int,
    orders: tuple[float, ...],
) -> FloatArray:
    alphas = np.asarray(orders, dtype=np.float64)
    scale = l2_sensitivity / (math.sqrt(survivors) * noise_stddev)
    tau = ddg_tau(noise_stddev, survivors)
    rdp: FloatArray = np.minimum(
        alphas * scale**2 / 2.0 + tau * dimension,
        alphas / 2.0 * (scale + math.sqrt(dimension) * tau) ** 2,
    )
    rdp.setflags(write=False)
    return rdp


def rdp_ddg(
    noise_stddev: float,
    survivors: int,
    l2_sensitivity: float,
    dimension: int,
    orders: tuple[float, ...] = DEFAULT_ORDERS,
) -> FloatArray:
    """RDP at each of ``orders`` of one DDG round (see the module docstring); cached, read-only."""
    return _rdp_cached(
        float(noise_stddev), int(survivors), float(l2_sensitivity), int(dimension), tuple(orders)
    )


def rdp_of_ddg_history(
    history: DDGHistory, orders: tuple[float, ...] = DEFAULT_ORDERS
) -> FloatArray:
    """Total RDP at ``orders`` of ``((σ, n, Δ2, d, rounds), ...)``: rounds add RDP."""
    total = np.zeros(len(orders), dtype=np.float64)
    for sigma, n, l2, d, rounds in history:
        total = total + rounds * rdp_ddg(sigma, n, l2, d, orders)
    return total


class DDGAccountant:
    """Device-level RDP accountant of :class:`DDGEvent` rounds (no sampling amplification)."""

    name: ClassVar[str] = "ddg-rdp"
    mechanisms: ClassVar[frozenset[str]] = frozenset({DISTRIBUTED_DISCRETE_GAUSSIAN})

    def __init__(self, orders: tuple[float, ...] = DEFAULT_ORDERS) -> None:
        self.orders = tuple(float(a) for a in orders)
        self._rounds: dict[tuple[float, int, float, int], int] = {}

    # ------------------------------------------------------------ composing
    def _check(self, event: object) -> DDGEvent:
        if not isinstance(event, DDGEvent):
            raise PrivacyError(
                f"the {self.name} accountant does not understand {type(event).__name__}; "
                "it composes device-level DDGEvent only"
            )
        if event.mechanism not in self.mechanisms:  # pragma: no cover - DDGEvent checks it
            raise PrivacyError(
                f"the {self.name} accountant does not support mechanism {event.mechanism!r}"
            )
        return event

    def compose(self, event: DDGEvent) -> None:
        """Add one round."""
        self.compose_many((event,))

    def compose_many(self, events: Iterable[DDGEvent]) -> None:
        """Add several rounds; if any event is refused, none is composed."""
        checked = [self._check(e) for e in events]
        for e in checked:
            key = (e.noise_stddev, e.survivors, e.l2_sensitivity, e.dimension)
            self._rounds[key] = self._rounds.get(key, 0) + 1

    @property
    def history(self) -> DDGHistory:
        """What has been composed: ``((σ, n, Δ2, d, rounds), ...)`` sorted."""
        return tuple((*key, rounds) for key, rounds in sorted(self._rounds.items()))

    # ------------------------------------------------------------ epsilon
    def get_epsilon(self, delta: float) -> float:
        """The ε (an upper bound) of every round composed so far, at ``delta``; 0.0 if none."""
        delta = check_delta(delta)
        history = self.history
        if not history:
            return 0.0
        return epsilon_from_rdp(self.orders, rdp_of_ddg_history(history, self.orders), delta)

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The composed history, tagged with accountant name, mechanism and version."""
        return {
            "accountant": self.name,
            "mechanism": DISTRIBUTED_DISCRETE_GAUSSIAN,
            "version": STATE_VERSION,
            "history": [dict(zip(_STATE_FIELDS, entry, strict=True)) for entry in self.history],
        }

    def load_state_dict(self, state: object) -> None:
        """Replace the history with ``state``; refuse another accountant's or mechanism's state."""
        _, history = state_history(state, self.name, self.mechanisms)
        rounds: dict[tuple[float, int, float, int], int] = {}
        for entry in history:
            if not isinstance(entry, dict) or set(entry) != set(_STATE_FIELDS):
                raise PrivacyError(f"accountant state: malformed history entry {entry!r}")
            count = entry["rounds"]
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise PrivacyError(f"accountant state: rounds must be an int >= 1, got {count!r}")
            # Reuse the event's validation of σ, n, Δ2 and d.
            event = DDGEvent(
                device="state",
                round=0,
                noise_stddev=entry["noise_stddev"],
                survivors=entry["survivors"],
                l2_sensitivity=entry["l2_sensitivity"],
                dimension=entry["dimension"],
                delta=0.5,
            )
            key = (event.noise_stddev, event.survivors, event.l2_sensitivity, event.dimension)
            if key in rounds:
                raise PrivacyError(f"accountant state: duplicate history entry for {key}")
            rounds[key] = count
        self._rounds = rounds

    def __repr__(self) -> str:
        total = sum(self._rounds.values())
        return f"DDGAccountant({total} rounds in {len(self._rounds)} groups)"


def epsilon_for_device(events: Iterable[DDGEvent], delta: float) -> float:
    """Device-level ε at ``delta`` (an upper bound) of one device's DDG rounds; 0.0 for none.

    Events of several devices are refused: their rounds do not compose.
    """
    events = list(events)
    acc = DDGAccountant()
    acc.compose_many(events)
    devices = sorted({e.device for e in events})
    if len(devices) > 1:
        raise PrivacyError(
            f"epsilon_for_device takes one device's events, got devices {', '.join(devices)}"
        )
    return acc.get_epsilon(delta)
