"""Device-level DP parameters in a training request: one place that writes and reads them.

The coordinator plans the grid and the noise once per run and draws a rotation seed per
round (:mod:`fedlora.server.ddp`); every sampled device needs all of it to encode its
update (:func:`fedlora.ddp.encoding.encode`), so it travels in the training request's
config, in plaintext (none of it is secret: the seed only fixes the rotation). A device
rebuilds :class:`fedlora.ddp.encoding.DDPParams` from it, which validates every value as
it would a config's, and records the round in its ledger from the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedlora.ddp.encoding import DDPParams
from fedlora.errors import FedloraError, UpdateError

PREFIX = "ddp-"
#: Config key → DDPParams field.
_FIELDS = {
    "ddp-clip": "clip",
    "ddp-bits": "bits",
    "ddp-scale": "scale",
    "ddp-sigma": "noise_stddev",
    "ddp-dimension": "dimension",
    "ddp-block": "block",
    "ddp-beta": "beta",
}
SEED_KEY = "ddp-seed"
SURVIVORS_KEY = "ddp-min-survivors"
_INTS = {"bits", "dimension", "block"}

#: ``(params, rotation seed, min_survivors)`` as a device reads them.
Wired = tuple[DDPParams, int, int]


def to_fit_config(params: DDPParams, rotation_seed: int, min_survivors: int) -> dict[str, Any]:
    """The training request's device-level entries."""
    out: dict[str, Any] = {}
    for key, name in _FIELDS.items():
        value = getattr(params, name)
        out[key] = int(value) if name in _INTS else float(value)
    out[SEED_KEY] = int(rotation_seed)
    out[SURVIVORS_KEY] = int(min_survivors)
    return out


def from_fit_config(config: Mapping[str, Any]) -> Wired | None:
    """The entries of :func:`to_fit_config`, or None when the request has none;
    :class:`UpdateError` when some are missing or do not make valid parameters."""
    present = [k for k in (*_FIELDS, SEED_KEY, SURVIVORS_KEY) if k in config]
    if not present:
        return None
    missing = [k for k in (*_FIELDS, SEED_KEY, SURVIVORS_KEY) if k not in config]
    if missing:
        raise UpdateError(f"the training request lacks device-level DP entries {missing}")
    kwargs: dict[str, Any] = {}
    for key, name in _FIELDS.items():
        value = config[key]
        want = int if name in _INTS else float
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UpdateError(f"the training request's {key} is {value!r}, not a number")
        if want is int and not isinstance(value, int):
            raise UpdateError(f"the training request's {key} is {value!r}, not an integer")
        kwargs[name] = want(value)
    seed, survivors = config[SEED_KEY], config[SURVIVORS_KEY]
    for key, value in ((SEED_KEY, seed), (SURVIVORS_KEY, survivors)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UpdateError(f"the training request's {key} is {value!r}")
    if survivors < 2:
        raise UpdateError(f"the training request's {SURVIVORS_KEY} is {survivors}, below 2")
    try:
        params = DDPParams(**kwargs)
    except (FedloraError, ValueError) as exc:
        raise UpdateError(f"the training request's device-level DP parameters: {exc}") from None
    return params, int(seed), int(survivors)
