"""Pure functions on adapter updates: validation and weighted averaging.

Kept free of Flower and torch so that they can be tested against hand-computed
values and reused by the deployment coordinator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.errors import UpdateError


def validate_update(
    arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]], who: str = "update"
) -> None:
    """Raise UpdateError unless ``arrays`` has exactly ``shapes``, float32 and all finite."""
    if len(arrays) != len(shapes):
        raise UpdateError(
            f"{who} has {len(arrays)} tensors, the global adapter has {len(shapes)}: "
            "it was trained with a different LoRA config"
        )
    for i, (a, shape) in enumerate(zip(arrays, shapes, strict=True)):
        if not isinstance(a, np.ndarray) or tuple(a.shape) != tuple(shape):
            got = getattr(a, "shape", type(a).__name__)
            raise UpdateError(f"{who}: tensor {i} has shape {got}, expected {tuple(shape)}")
        if a.dtype != np.float32:
            raise UpdateError(f"{who}: tensor {i} has dtype {a.dtype}, expected float32")
        if not np.isfinite(a).all():
            raise UpdateError(f"{who}: tensor {i} contains NaN or Inf")


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


def apply_update(
    global_arrays: Sequence[np.ndarray], update: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """The next global adapter: global + mean update."""
    return [
        (g.astype(np.float32) + u.astype(np.float32))
        for g, u in zip(global_arrays, update, strict=True)
    ]
