"""The randomness DP-SGD draws from: OS-keyed ChaCha20, its draws, and the seeded variant."""

from __future__ import annotations

import hashlib
import math
import os
import pickle

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedlora.errors import PrivacyError
from fedlora.privacy import noise
from fedlora.privacy.noise import (
    KEY_BYTES,
    SECURE_SOURCE,
    SEEDED_SOURCE,
    RandomSource,
    SecureRandom,
    SeededRandom,
)

N = 1_000_000


def _chacha(key: bytes, nonce: bytes, n: int) -> bytes:
    return Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(n))


@pytest.fixture
def urandom_calls(monkeypatch):
    """Record what SecureRandom asks the OS for (and still hand out real randomness)."""
    calls: list[tuple[int, bytes]] = []
    real = os.urandom

    def recording(n: int) -> bytes:
        out = real(n)
        calls.append((n, out))
        return out

    monkeypatch.setattr(os, "urandom", recording)
    return calls


# ------------------------------------------------------------ the secure source
def test_the_key_is_256_bits_from_the_os_and_the_stream_is_chacha20_of_zeros(urandom_calls):
    src = SecureRandom()

    (key_n, key), (nonce_n, nonce) = urandom_calls
    assert (key_n, nonce_n) == (32, 16) and KEY_BYTES * 8 == 256
    assert src.random_bytes(100) == _chacha(key, nonce, 100)
    assert (src.source, src.reproducible) == (SECURE_SOURCE, False)
    assert isinstance(src, RandomSource)


def test_two_secure_sources_draw_different_streams():
    a, b = SecureRandom(), SecureRandom()

    assert a.random_bytes(64) != b.random_bytes(64)
    assert not np.array_equal(a.gaussian(1000, 1.0), b.gaussian(1000, 1.0))


def test_the_key_is_not_shown_and_not_pickled(urandom_calls):
    src = SecureRandom()
    key = urandom_calls[0][1]

    assert key.hex() not in repr(src) and repr(src) == "SecureRandom(source='os-csprng-chacha20')"
    with pytest.raises(TypeError, match="key stays in this process"):
        pickle.dumps(src)


def test_a_long_stream_restarts_under_a_fresh_nonce(monkeypatch, urandom_calls):
    monkeypatch.setattr(noise, "REKEY_BYTES", 64)
    src = SecureRandom()
    (_, key), (_, first) = urandom_calls

    out = src.random_bytes(200)  # 64 + 64 + 64 + 8: three restarts

    assert [n for n, _ in urandom_calls] == [32, 16, 16, 16, 16]
    nonces = [first] + [b for _, b in urandom_calls[2:]]
    assert out == b"".join(_chacha(key, n, 64) for n in nonces)[:200]


# ------------------------------------------------------------ the draws
def test_uniforms_are_53_bit_doubles_in_the_unit_interval():
    u = SecureRandom().uniform(N)

    assert u.dtype == np.float64 and u.shape == (N,)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert np.all(np.ldexp(u, 53) == np.floor(np.ldexp(u, 53)))  # k · 2⁻⁵³, k an integer
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / N)
    assert np.ldexp(u, 53).max() > 2**52  # the top bit is used


def test_uniforms_are_the_keystream_read_as_little_endian_words():
    a, b = SeededRandom(3), SeededRandom(3)

    words = np.frombuffer(b.random_bytes(8 * 5), dtype="<u8")

    assert a.uniform(5).tolist() == [(int(w) >> 11) * 2.0**-53 for w in words]


@pytest.mark.parametrize("q", [0.001, 0.05, 0.5])
def test_bernoulli_rate(q):
    draws = SecureRandom().bernoulli(q, N)

    assert draws.dtype == np.bool_
    assert abs(draws.mean() - q) < 5 * math.sqrt(q * (1 - q) / N)


def test_bernoulli_edges():
    src = SecureRandom()

    assert not src.bernoulli(0.0, 10_000).any()
    assert src.bernoulli(1.0, 10_000).all()
    assert src.bernoulli(0.5, 0).shape == (0,)


@pytest.mark.parametrize("std", [1.0, 2.5])
def test_gaussian_mean_variance_and_shape_on_a_million_draws(std):
    x = SecureRandom().gaussian(N, std)

    # Standard errors at n = 1e6: mean std/1000, variance std²·√(2/n) = 0.0014·std².
    assert x.dtype == np.float64 and x.shape == (N,)
    assert abs(x.mean()) < 5 * std / math.sqrt(N)
    assert abs(x.var() / std**2 - 1) < 5 * math.sqrt(2 / N)
    z = x / std
    assert abs(np.mean(z**4) - 3) < 5 * math.sqrt(96 / N)  # kurtosis of a normal: 3
    assert abs(np.mean(np.abs(z) < 1) - 0.6826894921) < 5 * math.sqrt(0.22 / N)
    assert abs(np.mean(np.abs(z) < 3) - 0.9973002039) < 5 * math.sqrt(0.0027 / N)


def test_gaussian_is_std_over_two_times_a_sum_of_four_box_muller_normals():
    a, b = SeededRandom(11), SeededRandom(11)

    got = a.gaussian(7, 3.0)

    parts = []
    for _ in range(4):
        u = b.uniform(8)  # 7 normals need 4 pairs; the 8th normal is dropped
        r = np.sqrt(-2.0 * np.log1p(-u[:4]))
        t = 2.0 * math.pi * u[4:]
        parts.append(np.concatenate((r * np.cos(t), r * np.sin(t)))[:7])
    assert np.array_equal(got, (parts[0] + parts[1] + parts[2] + parts[3]) * 1.5)


def test_std_zero_gives_zeros_without_drawing():
    a, b = SeededRandom(1), SeededRandom(1)

    assert not a.gaussian(5, 0.0).any()
    assert a.uniform(3).tolist() == b.uniform(3).tolist()  # nothing was consumed


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s: s.uniform(-1), "number of draws"),
        (lambda s: s.uniform(2.0), "number of draws"),
        (lambda s: s.bernoulli(1.5, 3), "Bernoulli probability"),
        (lambda s: s.bernoulli(float("nan"), 3), "Bernoulli probability"),
        (lambda s: s.gaussian(3, -1.0), "standard deviation"),
        (lambda s: s.gaussian(3, float("nan")), "standard deviation"),
    ],
)
def test_bad_arguments_are_refused(call, match):
    with pytest.raises(PrivacyError, match=match):
        call(SecureRandom())


# ------------------------------------------------------------ the seeded variant
def test_seeded_sources_reproduce_and_differ_by_seed():
    draws = [SeededRandom(s).gaussian(1000, 1.0) for s in (7, 7, 8)]

    assert np.array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], draws[2])
    src = SeededRandom(7)
    assert (src.source, src.reproducible) == (SEEDED_SOURCE, True)
    assert isinstance(src, RandomSource)


def test_the_seeded_key_is_a_domain_separated_hash_of_the_seed():
    """Pinned, so a change to the derivation (and to every reproducible run) is deliberate."""
    key = hashlib.sha256(b"fedlora.privacy.noise.SeededRandom.v1\x00" + (300).to_bytes(2, "big"))

    assert SeededRandom(300).random_bytes(48) == _chacha(key.digest(), bytes(16), 48)


def test_a_seeded_stream_restarts_reproducibly(monkeypatch):
    monkeypatch.setattr(noise, "REKEY_BYTES", 64)

    a, b = SeededRandom(5).random_bytes(200), SeededRandom(5).random_bytes(200)

    assert a == b and a[64:128] != a[:64]
    monkeypatch.setattr(noise, "REKEY_BYTES", 1 << 32)
    assert SeededRandom(5).random_bytes(200)[:64] == a[:64]


@pytest.mark.parametrize("seed", [-1, True, 1.5, "3"])
def test_bad_seeds_are_refused(seed):
    with pytest.raises(PrivacyError, match="noise seed"):
        SeededRandom(seed)
