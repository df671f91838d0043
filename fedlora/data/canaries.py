"""Canary records for the empirical privacy audit (``fedlora audit``), and how they get in.

A canary is a short random sequence of made-up words, repeated: nothing in any
device's notes predicts it, and a model that trained on it learns it quickly. Each
canary is given a random device of the fleet and, independently with probability ½,
is *inserted* into that device's training records (Steinke, Nasr & Jagielski 2023:
the inclusion coin is the secret the audit tries to guess). Every draw comes from
the seed given (:func:`draw_canaries`).

Canaries reach training only through :meth:`CanaryPlan.apply`, which
``fedlora.audit`` hands to the simulated devices as their data hook; the fleet's
data building never sees them, so no normal run can carry one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from fedlora.data.fleet import DeviceData
from fedlora.errors import ConfigError

#: The seed stream of canary draws (the fleet's own streams are 0..2).
_CANARY_STREAM = 18
_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))
WORDS = 5
WORD_LETTERS = (3, 6)
REPEATS = 4


@dataclass(frozen=True)
class Canary:
    text: str
    device_index: int
    included: bool


@dataclass(frozen=True)
class CanaryPlan:
    """Every canary, the device it belongs to, and whether it was inserted there."""

    canaries: tuple[Canary, ...]

    def __len__(self) -> int:
        return len(self.canaries)

    @cached_property
    def _by_device(self) -> dict[int, tuple[str, ...]]:
        out: dict[int, list[str]] = {}
        for c in self.canaries:
            if c.included:
                out.setdefault(c.device_index, []).append(c.text)
        return {k: tuple(v) for k, v in out.items()}

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(c.text for c in self.canaries)

    @property
    def included(self) -> np.ndarray:
        return np.array([c.included for c in self.canaries], dtype=bool)

    def inserted_into(self, device_index: int) -> tuple[str, ...]:
        """The canaries inserted into simulated device ``device_index``'s training records."""
        return self._by_device.get(device_index, ())

    def apply(self, device_index: int, data: DeviceData) -> DeviceData:
        """``data`` with this device's inserted canaries appended to its training records."""
        extra = self.inserted_into(device_index)
        if not extra:
            return data
        return DeviceData(device=data.device, train=data.train + extra, heldout=data.heldout)

    __call__ = apply  # a device's data hook: ``hook(index, data) -> data``


def canary_text(rng: np.random.Generator, vocabulary: Sequence[str] = ()) -> str:
    """One canary: WORDS random words (from ``vocabulary``, or made of random letters when it
    is empty), the phrase said REPEATS times."""
    words = []
    for _ in range(WORDS):
        if vocabulary:
            words.append(vocabulary[int(rng.integers(len(vocabulary)))])
        else:
            n = int(rng.integers(WORD_LETTERS[0], WORD_LETTERS[1] + 1))
            words.append("".join(rng.choice(_LETTERS, size=n)))
    phrase = " ".join(words)
    return ". ".join([phrase] * REPEATS) + "."


def draw_canaries(
    count: int, num_devices: int, seed: int, vocabulary: Sequence[str] = ()
) -> CanaryPlan:
    """``count`` distinct canaries, each on a uniformly random device, each inserted w.p. ½.

    ``vocabulary``: the words canaries are made of. The audit passes the tokenizer's
    whole-word tokens, so each word is one token and a canary's word-to-word transitions
    are its own (random letters share their letter pairs with every other canary, and
    learning those from the inserted canaries lowers the others' loss too).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ConfigError(f"an audit needs at least 2 canaries, got {count!r}")
    if num_devices < 1:
        raise ConfigError(f"canaries need a fleet with devices, got {num_devices}")
    rng = np.random.default_rng([seed, _CANARY_STREAM])
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < count:
        text = canary_text(rng, vocabulary)
        if text not in seen:
            seen.add(text)
            texts.append(text)
    devices = rng.integers(0, num_devices, size=count)
    coins = rng.random(count) < 0.5
    return CanaryPlan(
        tuple(
            Canary(text=t, device_index=int(d), included=bool(c))
            for t, d, c in zip(texts, devices, coins, strict=True)
        )
    )
