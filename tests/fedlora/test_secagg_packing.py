"""fedlora.secagg.packing and quantize: the modulus' width on the wire, and the mean back."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.errors import UpdateError
from fedlora.privacy.noise import SeededRandom
from fedlora.secagg import packing, quantize

SHAPES = [(1,), (3, 4), (5,)]


@pytest.mark.parametrize(("bits", "width"), [(4, 1), (8, 1), (12, 2), (16, 2), (20, 4), (32, 4)])
def test_values_travel_at_the_modulus_width_and_come_back(bits, width):
    rng = np.random.default_rng(bits)
    vector = [rng.integers(0, 2**bits, s, dtype=np.uint64) for s in SHAPES]

    blobs = packing.pack(vector, 2**bits)
    back = packing.unpack(blobs, SHAPES, 2**bits)

    assert [len(b) for b in blobs] == [width * 1, width * 12, width * 5]
    assert all(
        np.array_equal(a, b) and b.dtype == np.uint64 for a, b in zip(vector, back, strict=True)
    )


@pytest.mark.parametrize(
    ("blobs", "match"),
    [
        ([bytes(4), bytes(48)], "2 arrays, expected 3"),
        ([bytes(4), bytes(48), bytes(24)], "array 2 is 24 bytes, expected 20"),
        ([bytes(8), bytes(96), bytes(40)], "array 0 is 8 bytes, expected 4"),  # int64, Flower's
        ([bytes(4), bytes(48), "x" * 20], "array 2 is str"),
    ],
)
def test_a_payload_of_the_wrong_size_is_refused(blobs, match):
    with pytest.raises(UpdateError, match=match):
        packing.unpack(blobs, SHAPES, 2**32)


def test_a_value_beyond_a_narrow_modulus_is_refused():
    blobs = [np.array([2**20], "<u4").tobytes(), bytes(48), bytes(20)]
    with pytest.raises(UpdateError, match="value >= the modulus"):
        packing.unpack(blobs, SHAPES, 2**20)
    with pytest.raises(UpdateError, match="not reduced"):
        packing.pack([np.array([2**20], np.uint64)], 2**20)


def test_stochastic_rounding_is_unbiased_and_seeded_by_its_source():
    x = np.full(200_000, 2.3)

    a = quantize.stochastic_round(x, SeededRandom(1))
    b = quantize.stochastic_round(x, SeededRandom(1))
    c = quantize.stochastic_round(x, SeededRandom(2))

    assert set(np.unique(a).tolist()) == {2, 3}
    assert abs(a.mean() - 2.3) < 5 * np.sqrt(0.21 / x.size)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_encode_then_decode_gives_the_weighted_mean_within_a_level():
    clip, levels, max_weight = 8.0, 2**22, 100.0
    rng = np.random.default_rng(0)
    updates = [[rng.uniform(-1, 1, (3, 4)), rng.uniform(-1, 1, (5,))] for _ in range(4)]
    weights = [10, 100, 37, 64]
    total = None
    for i, (u, w) in enumerate(zip(updates, weights, strict=True)):
        v = quantize.encode(
            u, w, max_weight=max_weight, clipping_range=clip, target_range=levels,
            source=SeededRandom(i),
        )  # fmt: skip
        assert int(v[0][0]) == round(w / max_weight * levels)
        total = v if total is None else [a + b for a, b in zip(total, v, strict=True)]

    got = quantize.decode(total, 4, clipping_range=clip, target_range=levels)

    want = [
        sum(w * u[k] for u, w in zip(updates, weights, strict=True)) / sum(weights)
        for k in range(2)
    ]
    err = 4 * 2 * clip / sum(round(w / max_weight * levels) for w in weights)
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True)) <= err


def test_a_weight_above_max_weight_is_refused_not_overflowed():
    with pytest.raises(UpdateError, match="overflow"):
        quantize.encode(
            [np.zeros(3)], 101, max_weight=100.0, clipping_range=8.0, target_range=2**22,
            source=SeededRandom(0),
        )  # fmt: skip
