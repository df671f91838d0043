"""fedlora.ddp.encoding: clip, rotate, round, noise, mod 2^b, and the mean back from the sum."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlora.ddp import discrete_gaussian as dg
from fedlora.ddp import encoding as enc
from fedlora.errors import UpdateError
from fedlora.privacy.noise import SecureRandom, SeededRandom

SEED = 2024  # the round's public rotation seed
DEVICES = 10


def updates(dimension: int, count: int = DEVICES, seed: int = 0) -> list[np.ndarray]:
    """Random updates of norms 0.2 to 3: the clip norm 1 shortens about half of them."""
    rng = np.random.default_rng(seed)
    out = []
    for norm in np.linspace(0.2, 3.0, count):
        v = rng.normal(size=dimension)
        out.append(v * norm / np.linalg.norm(v))
    return out


def clipped_mean(vectors: list[np.ndarray], clip: float) -> np.ndarray:
    return np.mean([v * min(1.0, clip / np.linalg.norm(v)) for v in vectors], axis=0)


def secagg_sum(vectors: list[np.ndarray], modulus: int, seed: int = 7) -> np.ndarray:
    """SecAgg+'s view: every vector masked (masks that cancel around a ring), summed mod 2^b."""
    rng = np.random.default_rng(seed)
    m = np.uint64(modulus)
    masks = [rng.integers(0, modulus, v.size, dtype=np.uint64) for v in vectors]
    total = np.zeros_like(vectors[0])
    for i, v in enumerate(vectors):
        masked = (v + masks[i] + (m - masks[i - 1])) % m  # + own mask − the previous one's
        assert not np.array_equal(masked, v)
        total = (total + masked) % m
    return total


def encode_all(vectors, params, source_seed: int = 1) -> list[np.ndarray]:
    return [
        enc.encode(v, params, SEED, SeededRandom(source_seed + i)) for i, v in enumerate(vectors)
    ]


def test_without_noise_the_decoded_mean_is_the_clipped_mean_within_the_rounding_bound():
    params = enc.DDPParams(clip=1.0, bits=20, scale=2000.0, noise_stddev=0.0, dimension=5000)
    vectors = updates(5000)
    truth = clipped_mean(vectors, 1.0)

    mean = enc.decode(secagg_sum(encode_all(vectors, params), params.modulus), params, SEED, 10)

    error = float(np.linalg.norm(mean - truth))
    assert error <= enc.rounding_error_bound(params)  # √5120 / 2000 = 0.036
    assert error < 0.1 * np.linalg.norm(truth)
    unclipped = np.mean(vectors, axis=0)  # clipping moved the mean 9 bounds away
    assert np.linalg.norm(mean - unclipped) > 5 * enc.rounding_error_bound(params)


@pytest.mark.parametrize("sigma", [4.0, 20.0])
def test_with_noise_the_residual_has_the_variance_of_the_summed_noise(sigma):
    dimension, scale = 8192, 2000.0  # two whole blocks: no padding is cut from the residual
    params = enc.DDPParams(clip=1.0, bits=20, scale=scale, noise_stddev=sigma, dimension=dimension)
    vectors = updates(dimension, seed=3)

    mean = enc.decode(secagg_sum(encode_all(vectors, params), params.modulus), params, SEED, 10)

    # back to integer units of the sum: the rotation keeps the noise's covariance V·I
    residual = (mean - clipped_mean(vectors, 1.0)) * DEVICES * scale / params.clip
    noise_var = DEVICES * dg.variance(sigma)
    low, high = noise_var, noise_var + DEVICES / 4  # rounding adds at most 1/4 per device
    standard_error = (noise_var + DEVICES / 4) * math.sqrt(2 / dimension)
    assert abs(residual.mean()) < 4 * math.sqrt(high / dimension)
    assert low - 4 * standard_error < np.mean(residual**2) < high + 4 * standard_error


def test_one_devices_noise_and_the_sums_noise_have_the_configured_variance():
    sigma, dimension = 20.0, 8192
    params = enc.DDPParams(clip=1.0, bits=20, scale=2000.0, noise_stddev=sigma, dimension=dimension)
    zero = np.zeros(dimension)  # rotates and rounds to exact zeros: only the noise is left

    one = enc.to_signed(enc.encode(zero, params, SEED, SeededRandom(5)), params.bits)
    total = enc.to_signed(
        secagg_sum(encode_all([zero] * DEVICES, params), params.modulus), params.bits
    )

    var = dg.variance(sigma)
    assert one.var() == pytest.approx(var, rel=4 * math.sqrt(2 / dimension))
    assert total.var() == pytest.approx(DEVICES * var, rel=4 * math.sqrt(2 / dimension))


def test_encode_is_integer_vector_mod_the_modulus():
    params = enc.DDPParams(clip=1.0, bits=10, scale=200.0, noise_stddev=30.0, dimension=3000)
    x = updates(3000, count=1)[0]

    encoded = enc.encode(x, params, SEED, SeededRandom(1))
    integers = enc.integer_vector(x, params, SEED, SeededRandom(1))

    assert encoded.dtype == np.uint64 and encoded.shape == (params.padded_dimension,)
    assert int(encoded.max()) < params.modulus and (integers < 0).any()
    assert np.array_equal(encoded, np.mod(integers, params.modulus).astype(np.uint64))


def _sums(params, vectors, rounds: int):
    """(true integer sums, their sums mod 2^b read as signed) over ``rounds`` rounds."""
    true, read = [], []
    for r in range(rounds):
        ints = [
            enc.integer_vector(v, params, SEED + r, SeededRandom(1000 * r + i))
            for i, v in enumerate(vectors)
        ]
        total = np.sum(ints, axis=0)
        true.append(total)
        read.append(enc.to_signed(np.mod(total, params.modulus).astype(np.uint64), params.bits))
    return np.array(true), np.array(read)


def test_tight_bits_wrap_no_more_often_than_the_bound_says():
    # 10 bits, 10 identical updates (aligned: the worst case for the signal), σ = 60
    params = enc.DDPParams(clip=1.0, bits=10, scale=200.0, noise_stddev=60.0, dimension=4096)
    vectors = updates(4096, count=1)[:1] * DEVICES
    h, margin = 512, 512 - DEVICES
    v = (DEVICES * 200.0) ** 2 / 4096 + DEVICES * 60.0**2
    per_coordinate = 2 * math.exp(-(margin**2) / (2 * v))  # 0.067

    true, read = _sums(params, vectors, rounds=4)

    outside = (true < -h) | (true >= h)
    assert enc.wrap_probability(params, DEVICES) == 1.0  # the union bound says: expect some
    assert 0 < outside.mean() <= per_coordinate  # it happens, and no more than bounded
    assert np.array_equal(read == true, ~outside)  # a coordinate decodes wrong iff it left


def test_where_the_bound_is_tiny_the_modular_sum_decodes_to_the_true_sum():
    params = enc.DDPParams(clip=1.0, bits=10, scale=200.0, noise_stddev=10.0, dimension=4096)
    vectors = updates(4096, count=1)[:1] * DEVICES

    true, read = _sums(params, vectors, rounds=4)

    assert enc.wrap_probability(params, DEVICES) < 1e-20
    assert np.array_equal(read, true)


def test_the_default_adapter_at_16_bits_round_trips_through_the_modular_sum():
    params = enc.choose_params(
        clip=1.0,
        bits=16,
        dimension=86_784,
        max_summands=DEVICES,
        min_survivors=8,
        sigma_for=lambda l2, d: 0.7 * l2 / math.sqrt(8),
    )
    vectors = updates(86_784, seed=11)

    mean = enc.decode(secagg_sum(encode_all(vectors, params), params.modulus), params, SEED, 10)

    # per coordinate, noise of std σ·√n·C/s over n, ≈ z·C/n·√(n/8): no wrap-around blow-up
    expected_std = params.noise_stddev * math.sqrt(DEVICES) * params.clip / params.scale / DEVICES
    assert enc.wrap_probability(params, DEVICES) <= 1e-9
    assert np.std(mean - clipped_mean(vectors, 1.0)) == pytest.approx(expected_std, rel=0.02)


def test_seeded_sources_repeat_and_secure_sources_do_not():
    params = enc.DDPParams(clip=1.0, bits=16, scale=500.0, noise_stddev=5.0, dimension=1000)
    x = updates(1000, count=1)[0]

    a, b = (enc.encode(x, params, SEED, SeededRandom(3)) for _ in range(2))
    c, d = (enc.encode(x, params, SEED, SecureRandom()) for _ in range(2))

    assert np.array_equal(a, b)
    assert not np.array_equal(c, d)


def test_conditional_rounding_redraws_until_within_the_bound():
    y = np.full(1024, 0.5)  # every coordinate 0 or 1: the squared norm is Binomial(1024, ½)
    bound = math.sqrt(512)  # about half of the roundings are longer

    rounded = [enc.conditional_round(y, bound, SeededRandom(i)) for i in range(20)]

    assert all(np.dot(r, r) <= 512 for r in rounded)
    assert np.mean([r.mean() for r in rounded]) == pytest.approx(0.5, abs=0.02)


def test_conditional_rounding_gives_up_on_an_impossible_bound():
    with pytest.raises(UpdateError, match="conditional rounding failed 100 times"):
        enc.conditional_round(np.full(16, 3.5), 1.0, SeededRandom(0))


@pytest.mark.parametrize(
    ("update", "match"),
    [(np.zeros(99), r"100 values, got shape \(99,\)"), (np.full(100, np.nan), "NaN")],
)
def test_a_malformed_update_is_refused(update, match):
    params = enc.DDPParams(clip=1.0, bits=16, scale=500.0, noise_stddev=5.0, dimension=100)

    with pytest.raises(UpdateError, match=match):
        enc.encode(update, params, SEED, SeededRandom(0))


@pytest.mark.parametrize(
    ("total", "survivors", "match"),
    [
        (np.zeros(256, dtype=np.uint64), 0, "at least one survivor"),
        (np.zeros(255, dtype=np.uint64), 3, "256 values"),
        (np.full(256, 2**16, dtype=np.uint64), 3, r"integers in \[0, 2\^16\)"),
        (np.zeros(256), 3, "integers"),
    ],
)
def test_a_malformed_sum_is_refused(total, survivors, match):
    params = enc.DDPParams(clip=1.0, bits=16, scale=500.0, noise_stddev=5.0, dimension=100)

    with pytest.raises(UpdateError, match=match):
        enc.decode(total, params, SEED, survivors)
