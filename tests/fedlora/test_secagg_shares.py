"""fedlora.secagg.shares: compact key shares, sealed and bound to round, sender, receiver."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.supercore.primitives.asymmetric import private_key_to_bytes, public_key_to_bytes

from fedlora.errors import UpdateError
from fedlora.secagg import shares


def _pair() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP384R1())
    return private_key_to_bytes(key), public_key_to_bytes(key.public_key())


def test_the_scalar_rebuilt_from_shares_gives_the_same_ecdh_secret_as_the_pem_key():
    sk, _ = _pair()
    _, other_pk = _pair()
    scalar = shares.private_scalar(sk)
    parts = create_shares(scalar, 3, 5)

    rebuilt = combine_shares(parts[1:4])  # any 3 of 5

    assert len(scalar) == 48 and rebuilt == scalar
    assert shares.ecdh(rebuilt, other_pk) == shares.ecdh(sk, other_pk)
    assert len(parts[0]) == 4 + 64  # vs 4 + 320 for the PEM text Flower shares


def test_both_devices_derive_one_channel_key_and_a_sealed_share_opens_only_as_sent():
    (sk_a, pk_a), (sk_b, pk_b) = _pair(), _pair()
    key = shares.channel_key(sk_a, pk_b)
    assert key == shares.channel_key(sk_b, pk_a) and len(key) == 32

    blob = shares.seal(key, b"shares of a", 3, 11, 12)

    assert len(blob) == 12 + len(b"shares of a") + 16
    assert shares.open_sealed(key, blob, 3, 11, 12) == b"shares of a"
    for rnd, src, dst in ((4, 11, 12), (3, 12, 11), (3, 11, 13)):  # replayed or misrouted
        with pytest.raises(UpdateError, match="does not authenticate"):
            shares.open_sealed(key, blob, rnd, src, dst)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(UpdateError, match="does not authenticate"):
        shares.open_sealed(key, tampered, 3, 11, 12)


def test_a_scalar_of_the_wrong_length_is_refused():
    with pytest.raises(UpdateError, match="48 bytes"):
        shares.private_key(b"\x01" * 32)
