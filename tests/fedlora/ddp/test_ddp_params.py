"""fedlora.ddp.params: the shared parameters, the wrap-around bound, choosing the scale."""

from __future__ import annotations

import math

import pytest

from fedlora.ddp import params as ddp
from fedlora.errors import ConfigError

FFA_DIMENSION = 86_784  # fedlora's default adapter with FFA
LORA_DIMENSION = 159_744  # the same adapter, plain LoRA
Z = 0.7
MIN_SURVIVORS, MAX_SUMMANDS = 8, 10


def sigma_for(l2: float, dimension: int) -> float:
    """The τ → 0 stand-in of the accountant's calibration: √n·σ / Δ₂ = z."""
    del dimension
    return Z * l2 / math.sqrt(MIN_SURVIVORS)


def choose(bits: int, **kw: object) -> ddp.DDPParams:
    args: dict = dict(
        clip=1.0,
        bits=bits,
        dimension=FFA_DIMENSION,
        max_summands=MAX_SUMMANDS,
        min_survivors=MIN_SURVIVORS,
        sigma_for=sigma_for,
    )
    args.update(kw)
    return ddp.choose_params(**args)


def test_properties():
    p = ddp.DDPParams(clip=0.5, bits=16, scale=1000, noise_stddev=3, dimension=FFA_DIMENSION)

    assert p.padded_dimension == 86_784
    assert p.modulus == 65_536
    assert p.block == 4096 and p.beta == math.exp(-0.5)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("clip", 0.0, "clip must be > 0"),
        ("clip", float("nan"), "clip must be finite"),
        ("bits", 33, r"bits must be in \[2, 32\]"),
        ("bits", 16.0, "bits must be an int"),
        ("scale", 2**15, r"scale must be in \(0, 2\^15\)"),
        ("scale", 0, "scale must be in"),
        ("noise_stddev", -1.0, "noise_stddev must be >= 0"),
        ("noise_stddev", float("inf"), "noise_stddev must be finite"),
        ("dimension", 0, "dimension must be >= 1"),
        ("block", 1000, "power of two"),
        ("beta", 1.0, r"beta must be in \[0, 1\)"),
    ],
)
def test_nonsense_is_refused(field, value, match):
    good = dict(clip=1.0, bits=16, scale=1000.0, noise_stddev=3.0, dimension=100)
    good[field] = value

    with pytest.raises(ConfigError, match=match):
        ddp.DDPParams(**good)


def test_l2_sensitivity_is_kairouz_et_al_theorem_1():
    s, d = 1000.0, 4096

    plain = ddp.l2_sensitivity(s, d, 0.0)
    conditional = ddp.l2_sensitivity(s, d, math.exp(-0.5))  # √(2 ln(1/β)) = 1

    assert plain == s + 64
    assert conditional == pytest.approx(math.sqrt(s * s + d / 4 + (s + 32)))
    assert conditional < plain
    # a tiny β: √(2 ln(1/β)) = 6.8, √(1 + 4 + 6.8·3) > 1 + √16, the plain bound is smaller
    assert ddp.l2_sensitivity(1.0, 16, 1e-10) == 5.0


@pytest.mark.parametrize(
    ("dimension", "bits", "expected"),
    [
        (FFA_DIMENSION, 16, 2 * 86_784 / 86_784),  # 2.0: no padding
        (LORA_DIMENSION, 16, 2.0),
        (FFA_DIMENSION, 20, 4 * 86_784 / 86_784),
        (FFA_DIMENSION, 8, 86_784 / 86_784),
    ],
)
def test_bytes_per_value(dimension, bits, expected):
    p = ddp.DDPParams(clip=1.0, bits=bits, scale=10.0, noise_stddev=1.0, dimension=dimension)

    assert ddp.bytes_per_value(p) == pytest.approx(expected)


def test_wrap_probability_is_the_union_of_sub_gaussian_tails():
    p = ddp.DDPParams(clip=1.0, bits=12, scale=100.0, noise_stddev=40.0, dimension=5000)
    v = (10 * 100.0) ** 2 / 1024 + 10 * 40.0**2  # the tail block (904 → 1024) is smallest

    assert ddp.wrap_probability(p, 10) == pytest.approx(
        2 * 5120 * math.exp(-((2048 - 10) ** 2) / (2 * v))
    )
    assert ddp.wrap_probability(p, 2048) == 1.0  # rounding alone could reach the edge
    assert ddp.wrap_probability(p, 1) < ddp.wrap_probability(p, 10)


@pytest.mark.parametrize("bits", [16, 20, 32])
def test_the_chosen_scale_is_the_largest_within_the_wrap_bound(bits):
    p = choose(bits)
    bigger = ddp.DDPParams(
        p.clip,
        bits,
        p.scale + 1,
        sigma_for(ddp.l2_sensitivity(p.scale + 1, 86_784, p.beta), 0),
        p.dimension,
    )

    assert p.scale == int(p.scale) >= math.sqrt(p.padded_dimension)
    assert p.noise_stddev == sigma_for(p.l2_sensitivity, p.padded_dimension)
    assert ddp.wrap_probability(p, MAX_SUMMANDS) <= ddp.DEFAULT_WRAP_BOUND
    assert ddp.wrap_probability(bigger, MAX_SUMMANDS) > ddp.DEFAULT_WRAP_BOUND


def test_more_bits_give_a_finer_grid_and_noise_closer_to_the_ideal():
    chosen = [choose(bits) for bits in (16, 20, 32)]
    # the float noise of the sum of MIN_SURVIVORS devices, over the ideal z·C
    price = [p.noise_stddev * math.sqrt(MIN_SURVIVORS) / p.scale / Z for p in chosen]

    assert chosen[0].scale < chosen[1].scale < chosen[2].scale
    assert 1 < price[2] < price[1] < price[0] < 1.001  # Δ₂ ≈ s: 16 bits cost < 0.1 % noise
    assert 3800 < chosen[0].scale < 4300  # the 256-value tail block bounds it


def test_a_looser_wrap_bound_allows_a_finer_grid():
    assert choose(16, wrap_bound=1e-6).scale > choose(16).scale > choose(16, wrap_bound=1e-12).scale


def test_too_few_bits_for_the_noise_is_one_clear_error():
    with pytest.raises(
        ConfigError, match=r"12 bits are too few for this noise.*use at least 13 bits"
    ):
        choose(12)


def test_too_few_bits_for_the_dimension_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"8 bits are too few for d = 86784.*use at least"):
        choose(8)


def test_sigma_for_must_return_a_number():
    with pytest.raises(ConfigError, match="sigma_for returned nan"):
        choose(16, sigma_for=lambda l2, d: float("nan"))


def test_min_survivors_cannot_exceed_max_summands():
    with pytest.raises(ConfigError, match="min_survivors"):
        choose(16, min_survivors=11)
