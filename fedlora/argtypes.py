"""argparse value types shared by the ``fedlora`` subcommands: one-line errors, no traceback."""

from __future__ import annotations

import argparse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def open_unit_interval(text: str) -> float:
    """A number strictly between 0 and 1 (a δ, a confidence)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {text}")
    return value


def gate_override(text: str) -> tuple[str, str, float]:
    """``NAME.KEY=VALUE`` (``int8.max_perplexity_increase=0.05``) as ``(name, key, value)``."""
    lhs, eq, raw = text.partition("=")
    name, dot, key = lhs.rpartition(".")
    if not (eq and dot and name and key):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NAME.KEY=VALUE, e.g. int8.max_perplexity_increase=0.05"
        )
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {raw!r} is not a number") from None
    return name, key, value
