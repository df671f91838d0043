"""fedlora.ddp.rotation: blocks and their padding, exact inverse, norm, seeded signs."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.ddp import rotation
from fedlora.errors import ConfigError


@pytest.mark.parametrize(
    ("dimension", "padded", "tail"),
    [
        (86_784, 86_784, (512, 256)),  # 21 blocks + 768 = 512 + 256 values: no padding
        (159_744, 159_744, ()),  # 39 whole blocks, no padding
        (39_040, 39_168, (2048, 256)),  # the embedded adapter: 2176 values → 2048 + 256
        (4096 + 1, 4096 + 256, (256,)),  # a short tail is padded to MIN_TAIL_BLOCK
        (10, 256, (256,)),
        (3000, 3072, (2048, 1024)),
        (4000, 4096, (4096,)),  # rounded up to a whole block
    ],
)
def test_only_the_rest_is_split_into_powers_of_two_and_padded_to_256(dimension, padded, tail):
    sizes = rotation.block_sizes(dimension)

    assert rotation.padded_dimension(dimension) == padded
    full = (dimension // rotation.DEFAULT_BLOCK) if dimension % rotation.DEFAULT_BLOCK else 0
    if dimension % rotation.DEFAULT_BLOCK == 0:
        full = dimension // rotation.DEFAULT_BLOCK
    assert sizes == (rotation.DEFAULT_BLOCK,) * full + tail
    assert padded - dimension < rotation.MIN_TAIL_BLOCK
    assert rotation.smallest_block(dimension) == min(sizes)


def test_padding_overhead_of_the_default_adapters_is_small():
    ffa = rotation.padded_dimension(21_248) / 21_248 - 1  # embedded default, FFA
    lora = rotation.padded_dimension(39_040) / 39_040 - 1  # embedded default, plain LoRA

    assert ffa == 0
    assert lora == pytest.approx(128 / 39_040)  # 0.33 %


@pytest.mark.parametrize(("dimension", "block"), [(86_784, 4096), (1000, 64), (7, 2), (4096, 4096)])
def test_unrotate_inverts_rotate_and_the_norm_is_kept(dimension, block):
    x = np.random.default_rng(dimension).normal(size=dimension)

    y = rotation.rotate(x, seed=12, block=block)
    back = rotation.unrotate(y, seed=12, dimension=dimension, block=block)

    assert y.shape == (rotation.padded_dimension(dimension, block),)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-12)


def test_fwht_matches_the_hadamard_matrix():
    size = 8
    hadamard = np.array([[1.0]])
    while hadamard.shape[0] < size:
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    rows = np.random.default_rng(0).normal(size=(3, size))

    np.testing.assert_allclose(
        rotation.fwht(rows), rows @ hadamard.T / np.sqrt(size), rtol=0, atol=1e-12
    )


def test_the_rotation_spreads_a_spike_over_its_block():
    x = np.zeros(4096)
    x[17] = 1.0

    y = rotation.rotate(x, seed=3)

    np.testing.assert_allclose(np.abs(y), 1 / 64, rtol=1e-12)


def test_signs_depend_on_the_seed_only():
    a, b, c = rotation.signs(5, 1000), rotation.signs(5, 1000), rotation.signs(6, 1000)

    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert set(np.unique(a)) == {-1.0, 1.0}
    assert abs(a.mean()) < 0.15
    assert np.array_equal(rotation.signs(5, 10), a[:10])  # a prefix, whatever the length


@pytest.mark.parametrize("block", [0, 1, 3, 4095, 2**25, True, 4096.0])
def test_a_block_that_is_not_a_power_of_two_is_refused(block):
    with pytest.raises(ConfigError, match="power of two"):
        rotation.padded_dimension(100, block)


def test_unrotate_refuses_a_vector_of_the_wrong_length():
    with pytest.raises(ConfigError, match="has 256 values"):
        rotation.unrotate(np.zeros(255), seed=0, dimension=10)
