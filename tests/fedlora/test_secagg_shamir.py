"""fedlora.secagg.shamir: Flower's Shamir shares, split fast on a device and rebuilt fast
by the coordinator, interchangeable with Flower's (PyCryptodome's) both ways."""

from __future__ import annotations

import contextlib
import os
import random
import time

import pytest
from flwr.common.secure_aggregation.crypto.shamir import combine_shares as flower_combine
from flwr.common.secure_aggregation.crypto.shamir import create_shares

from fedlora.errors import UpdateError
from fedlora.secagg import shamir


@pytest.mark.parametrize("seed", range(40))
def test_rebuilds_the_secret_flower_rebuilds_from_any_threshold_or_more_shares(seed):
    rng = random.Random(seed)
    secret = os.urandom(rng.choice([1, 15, 16, 32, 48, 60]))
    threshold = rng.randint(1, 12)
    num = rng.randint(threshold, 24)
    parts = create_shares(secret, threshold, num)
    given = rng.sample(parts, rng.randint(threshold, num))

    assert shamir.combine_shares(given, threshold) == flower_combine(given) == secret


def test_field_arithmetic_agrees_with_pycryptodome():
    from Crypto.Protocol.SecretSharing import _Element

    rng = random.Random(1)
    for _ in range(200):
        a, b = rng.getrandbits(128), rng.getrandbits(rng.choice([3, 64, 128]))
        assert shamir._mul(a, b) == int(_Element(a) * _Element(b))
        if a:
            assert shamir._mul(a, shamir._inverse(a)) == 1


def test_too_few_or_malformed_shares_are_refused_not_guessed():
    parts = create_shares(os.urandom(32), 3, 5)

    with pytest.raises(UpdateError, match="2 distinct share"):
        shamir.combine_shares(parts[:2], 3)
    with pytest.raises(UpdateError, match="2 distinct share"):  # a repeat is not a share
        shamir.combine_shares([parts[0], parts[0], parts[1]], 3)
    with pytest.raises(UpdateError, match="4 \\+ 16"):
        shamir.combine_shares([*parts[:2], parts[2][:-1]], 3)
    with pytest.raises(UpdateError, match="same length"):
        shamir.combine_shares([*parts[:2], parts[2] + bytes(16)], 3)


def test_an_altered_share_never_yields_the_secret():
    secret = os.urandom(32)
    parts = create_shares(secret, 3, 5)
    bad = bytearray(parts[0])
    bad[10] ^= 1

    try:
        rebuilt = shamir.combine_shares([bytes(bad), *parts[1:3]], 3)
    except UpdateError:
        return  # the padding check caught it
    assert rebuilt != secret


def test_a_round_of_100_secrets_costs_milliseconds_where_flowers_costs_seconds():
    """At 100 devices (k = 35 shares each, threshold 18) Flower's rebuild took 12 s of the
    coordinator's one thread at unmasking; this is the figure that motivated the module."""
    secrets = [os.urandom(32) for _ in range(100)]
    shares = [create_shares(s, 18, 35) for s in secrets]

    started = time.process_time()
    rebuilt = [shamir.combine_shares(p, 18) for p in shares]
    ours = time.process_time() - started
    started = time.process_time()
    assert flower_combine(shares[0]) == secrets[0]
    flowers_one = time.process_time() - started

    assert rebuilt == secrets
    assert ours < 10 * flowers_one, f"100 secrets {ours:.3f}s vs Flower's one {flowers_one:.3f}s"


@pytest.mark.parametrize("seed", range(40))
def test_shares_fedlora_splits_are_flowers_format_and_flower_rebuilds_them(seed):
    rng = random.Random(seed)
    secret = os.urandom(rng.choice([0, 1, 15, 16, 32, 48, 60]))
    threshold = rng.randint(1, 12)
    num = rng.randint(threshold, 24)

    parts = shamir.create_shares(secret, threshold, num)
    flowers = create_shares(secret, threshold, num)
    given = rng.sample(parts, rng.randint(threshold, num))

    assert [len(p) for p in parts] == [len(p) for p in flowers]
    assert [p[:4] for p in parts] == [p[:4] for p in flowers]  # indices 1..num, little-endian
    assert flower_combine(given) == shamir.combine_shares(given, threshold) == secret


def test_fewer_shares_than_the_threshold_do_not_give_the_secret_and_splits_are_fresh():
    secret = os.urandom(32)
    first, second = shamir.create_shares(secret, 3, 5), shamir.create_shares(secret, 3, 5)

    assert all(a[4:] != b[4:] for a, b in zip(first, second, strict=True))  # new coefficients
    # Two of three: a line through them lands anywhere but on the secret (or on no padding).
    with contextlib.suppress(UpdateError):
        assert shamir.combine_shares(first[:2], 2) != secret
    with pytest.raises(UpdateError):
        shamir.create_shares(secret, 0, 5)
    with pytest.raises(UpdateError):
        shamir.create_shares(secret, 6, 5)


def test_a_devices_key_sharing_at_100_devices_costs_milliseconds():
    """At 100 devices a device shares a 32-byte seed and a 48-byte key to 35 neighbours at
    threshold 18: through PyCryptodome that was most of a 73-ms key-sharing message."""
    seed, key = os.urandom(32), os.urandom(48)

    started = time.process_time()
    ours = [shamir.create_shares(s, 18, 35) for s in (seed, key)]
    ours_s = time.process_time() - started
    started = time.process_time()
    create_shares(seed, 18, 35)
    create_shares(key, 18, 35)
    flowers_s = time.process_time() - started

    assert [shamir.combine_shares(p[5:23], 18) for p in ours] == [seed, key]
    assert ours_s * 3 < flowers_s, f"{ours_s:.4f}s vs Flower's {flowers_s:.4f}s"
