"""Shared builders for the privacy tests."""

from __future__ import annotations

from typing import Any

from fedlora.privacy.events import DDGEvent, DPSGDEvent


def event(**overrides: Any) -> DPSGDEvent:
    """A valid DPSGDEvent; keyword arguments replace its fields."""
    fields: dict[str, Any] = {
        "device": "dev-1",
        "round": 1,
        "noise_multiplier": 1.0,
        "sample_rate": 0.1,
        "steps": 10,
        "delta": 1e-5,
    }
    fields.update(overrides)
    return DPSGDEvent(**fields)


def schedule(
    groups: tuple[tuple[float, float, int], ...], delta: float = 1e-5, device: str = "dev-1"
) -> list[DPSGDEvent]:
    """One event per (σ, q, steps) group, in consecutive rounds."""
    return [
        event(device=device, round=r, noise_multiplier=s, sample_rate=q, steps=n, delta=delta)
        for r, (s, q, n) in enumerate(groups)
    ]


def ddg_event(**overrides: Any) -> DDGEvent:
    """A valid DDGEvent; keyword arguments replace its fields."""
    fields: dict[str, Any] = {
        "device": "dev-1",
        "round": 1,
        "noise_stddev": 4.0,
        "survivors": 10,
        "l2_sensitivity": 1.0,
        "dimension": 1024,
        "delta": 1e-5,
    }
    fields.update(overrides)
    return DDGEvent(**fields)


def ddg_rounds(rounds: int, device: str = "dev-1", **overrides: Any) -> list[DDGEvent]:
    """``rounds`` device-level events of one device in consecutive rounds."""
    return [ddg_event(device=device, round=r, **overrides) for r in range(1, rounds + 1)]
