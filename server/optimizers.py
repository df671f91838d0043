"""Server optimizers: how the coordinator turns a round's mean update into the next adapter.

The mean of the devices' updates Δ is a pseudo-gradient (Reddi et al. 2021, "Adaptive
Federated Optimization"; Δ already points downhill, so it is *added*):

* ``fedavg``: global + Δ, exactly what the coordinator always did (no state);
* ``fedavgm``: v ← β·v + Δ; global ← global + η·v (server momentum; η = 1.0 by default);
* ``fedadam``: m ← β1·m + (1 − β1)·Δ; v ← β2·v + (1 − β2)·Δ²;
  global ← global + η·m / (√v + τ), as the paper's Algorithm 2: no bias correction,
  v starts at τ². Defaults η = 0.01, β1 = 0.9, β2 = 0.99, τ = 1e-3: the paper fixes
  β1 = 0.9 and β2 = 0.99 for its adaptive methods, τ = 1e-3 is its default adaptivity,
  and a server learning rate around 1e-2 is where FedAdam did best on most of its tasks.

β is ``training.server_momentum`` (fedavgm's β, fedadam's β1), η is
``training.server_learning_rate`` (null: the optimizer's default). The state (momentum,
moments) is per adapter tensor, in float64, with the number of steps taken; a step whose
next adapter is not finite leaves the state as it was (the coordinator then discards the
round). The state after a round is saved beside the round's checkpoint
(``round-NNNN.safetensors`` → ``server-optimizer-NNNN.safetensors``) so a resumed run
continues with it; a state of another optimizer, other settings or other shapes is refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors import safe_open

from fedlora.config import TrainingSection
from fedlora.errors import ConfigError
from fedlora.server.aggregate import apply_update
from fedlora.server.checkpoint import save_tensors_atomic

#: The default server learning rate of each optimizer (``training.server_learning_rate`` null).
DEFAULT_LR = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 0.01}
#: FedAdam's second-moment decay and adaptivity (Reddi et al. 2021's defaults), not configurable.
ADAM_BETA2 = 0.99
ADAM_TAU = 1e-3
STATE_FORMAT = "fedlora.server-optimizer"
#: What a checkpoint's ``round-`` prefix becomes in its optimizer state's name (not
#: ``round-*``: tools that look for the last adapter checkpoint glob ``round-*.safetensors``).
STATE_PREFIX = "server-optimizer-"


class ServerOptimizer:
    """``step(global, mean)`` → the next global adapter; state that resumes with the run."""

    def __init__(self, training: TrainingSection, names: Sequence[str]) -> None:
        self.name = training.server_optimizer
        self.lr = (
            DEFAULT_LR[self.name]
            if training.server_learning_rate is None
            else training.server_learning_rate
        )
        self.beta = training.server_momentum
        self.names = list(names)
        self.steps = 0
        #: Slot name ("momentum"; "m", "v") → one float64 array per adapter tensor.
        self.slots: dict[str, list[np.ndarray]] = {}

    @property
    def settings(self) -> dict[str, float | str]:
        """What a saved state must have been written with to be continued."""
        out: dict[str, float | str] = {"optimizer": self.name, "lr": self.lr}
        if self.name != "fedavg":
            out["beta"] = self.beta
        if self.name == "fedadam":
            out.update(beta2=ADAM_BETA2, tau=ADAM_TAU)
        return out

    def step(
        self, global_arrays: Sequence[np.ndarray], mean: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        """The next global adapter (float32). The state advances only with a finite step;
        a step that is not (the adapter or the state would not be finite) returns a
        non-finite adapter, which the coordinator discards with its round."""
        if self.name == "fedavg":
            return apply_update(global_arrays, mean)
        with np.errstate(all="ignore"):  # a step that is not finite is checked for below
            slots, moves = self._moves([np.asarray(u, dtype=np.float64) for u in mean])
        if not all(np.isfinite(a).all() for arrays in slots.values() for a in arrays):
            return [np.full(np.shape(g), np.nan, np.float32) for g in global_arrays]
        new = [
            (np.asarray(g, dtype=np.float64) + mv).astype(np.float32)
            for g, mv in zip(global_arrays, moves, strict=True)
        ]
        if all(np.isfinite(a).all() for a in new):
            self.slots = slots
            self.steps += 1
        return new

    def _moves(
        self, deltas: list[np.ndarray]
    ) -> tuple[dict[str, list[np.ndarray]], list[np.ndarray]]:
        """The state after this step, and what it adds to each tensor (float64)."""
        if self.name == "fedavgm":
            old = self.slots.get("momentum") or [np.zeros_like(d) for d in deltas]
            slots = {"momentum": [self.beta * v + d for v, d in zip(old, deltas, strict=True)]}
            moves = [self.lr * v for v in slots["momentum"]]
        else:  # fedadam
            m0 = self.slots.get("m") or [np.zeros_like(d) for d in deltas]
            v0 = self.slots.get("v") or [np.full_like(d, ADAM_TAU**2) for d in deltas]
            b1, b2 = self.beta, ADAM_BETA2
            m = [b1 * a + (1 - b1) * d for a, d in zip(m0, deltas, strict=True)]
            v = [b2 * a + (1 - b2) * d * d for a, d in zip(v0, deltas, strict=True)]
            slots = {"m": m, "v": v}
            moves = [self.lr * a / (np.sqrt(b) + ADAM_TAU) for a, b in zip(m, v, strict=True)]
        return slots, moves

    # ------------------------------------------------------------ state on disk
    def save(self, checkpoint: Path) -> Path | None:
        """Write the state beside ``checkpoint`` (atomically); fedavg has none to write."""
        if self.name == "fedavg":
            return None
        tensors = {
            f"{slot}/{n}": np.ascontiguousarray(a)
            for slot, arrays in sorted(self.slots.items())
            for n, a in zip(self.names, arrays, strict=True)
        }
        metadata = {
            "format": STATE_FORMAT,
            "settings": json.dumps(self.settings, sort_keys=True),
            "steps": str(self.steps),
            "checkpoint": checkpoint.name,
        }
        return save_tensors_atomic(state_path(checkpoint), tensors, metadata)

    def load(self, checkpoint: Path, shapes: Sequence[tuple[int, ...]]) -> None:
        """Continue from the state saved beside ``checkpoint``; ConfigError if it is not
        this optimizer's, with these settings and shapes. No file: the state of a run that
        has taken no step yet (round 0's checkpoint, or a fedavg run)."""
        path = state_path(checkpoint)
        if not path.exists():
            if self.name != "fedavg" and _checkpoint_round(checkpoint) != 0:
                raise ConfigError(
                    f"{path} is missing: the {self.name} server optimizer's state after "
                    f"{checkpoint.name} is needed to resume; restore it from backup"
                )
            self.slots, self.steps = {}, 0
            return
        try:
            with safe_open(str(path), framework="numpy") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
            saved = json.loads(meta.get("settings", "null"))
            steps = int(meta.get("steps", "-1"))
        except Exception as exc:  # a torn or foreign file: any parse error
            raise ConfigError(f"{path} cannot be read ({exc}); the run cannot be resumed") from None
        if meta.get("checkpoint") != checkpoint.name:
            raise ConfigError(
                f"{path} was written after {meta.get('checkpoint')!r}, not {checkpoint.name!r}: "
                "it is another round's state; restore this round's from backup"
            )
        if meta.get("format") != STATE_FORMAT or saved != self.settings:
            raise ConfigError(
                f"{path} holds the state of server optimizer {saved}, not of this run's "
                f"{self.settings}: the run cannot be resumed with it"
            )
        slots: dict[str, list[np.ndarray]] = {}
        want = ("momentum",) if self.name == "fedavgm" else ("m", "v")
        for slot in want:
            arrays = [tensors.get(f"{slot}/{n}") for n in self.names]
            got = [None if a is None else tuple(a.shape) for a in arrays]
            if got != [tuple(s) for s in shapes]:
                raise ConfigError(
                    f"{path}: {slot} has shapes {got}, the adapter's are {list(shapes)}: "
                    "it is not this run's server optimizer state"
                )
            slots[slot] = [np.asarray(a, dtype=np.float64) for a in arrays if a is not None]
        if len(tensors) != len(want) * len(self.names) or steps < 0:
            raise ConfigError(f"{path} holds tensors or a step count this optimizer does not")
        self.slots, self.steps = slots, steps


def state_path(checkpoint: Path) -> Path:
    """``round-NNNN.safetensors`` → ``server-optimizer-NNNN.safetensors`` beside it."""
    return checkpoint.with_name(STATE_PREFIX + checkpoint.name.removeprefix("round-"))


def _checkpoint_round(checkpoint: Path) -> int | None:
    try:
        with safe_open(str(checkpoint), framework="numpy") as fh:
            value = (fh.metadata() or {}).get("round")
        return None if value is None else int(value)
    except Exception:  # unreadable: not round 0 as far as we can tell
        return None
