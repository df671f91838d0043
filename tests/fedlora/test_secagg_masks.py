"""fedlora.secagg.masks: ChaCha20 keystreams keyed by HKDF of the full secret."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.supercore.primitives.asymmetric import private_key_to_bytes, public_key_to_bytes
from scipy.stats import chisquare

from fedlora.errors import UpdateError
from fedlora.secagg import masks
from fedlora.secagg.masks import Purpose, mask

SECRET = bytes(range(48))  # the length of a raw P-384 ECDH secret
SHAPES = [(1,), (64, 8), (500,)]


def test_keystream_equals_chacha20_from_cryptography_directly():
    """Known answer: the key is HKDF-SHA256(secret, info = domain ‖ purpose ‖ round) and the
    stream is ChaCha20 under nonce 0⁴ ‖ purpose ‖ 0³ ‖ round, both built here from scratch."""
    info = b"fedlora/secagg/v1/mask/pairwise/" + (3).to_bytes(8, "big")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(SECRET)
    nonce = bytes(4) + b"\x01" + bytes(3) + (3).to_bytes(8, "little")
    stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(4 * 9))
    want = np.frombuffer(stream, "<u4").astype(np.uint64)

    got = mask(SECRET, Purpose.PAIRWISE, 3, [(1,), (2, 4)], 2**32)

    assert got[0].tolist() == want[:1].tolist()
    assert got[1].tolist() == want[1:].reshape(2, 4).tolist()
    assert got[1].dtype == np.uint64


def test_chacha20_itself_matches_rfc_7539_test_vector():
    """RFC 7539 §2.4.2's key and nonce (counter 1): the first keystream bytes."""
    key = bytes(range(32))
    nonce = (1).to_bytes(4, "little") + bytes.fromhex("000000000000004a00000000")
    stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(16))
    assert stream.hex() == "224f51f3401bd9e12fde276fb8631ded"


def test_masks_are_uniform_and_bit_balanced():
    values = mask(SECRET, Purpose.SELF, 1, [(200_000,)], 2**32)[0]

    # 256 equal buckets of the top byte: chi-square against uniform (df = 255).
    counts = np.bincount((values >> np.uint64(24)).astype(np.int64), minlength=256)
    assert chisquare(counts).pvalue > 1e-4
    # Every one of the 32 bits is set in about half the values (±5σ of a fair coin).
    bits = np.array([((values >> np.uint64(b)) & np.uint64(1)).mean() for b in range(32)])
    assert np.abs(bits - 0.5).max() < 5 * 0.5 / np.sqrt(values.size)
    # The largest value can be drawn (Flower's randint(0, 2^b - 1) never draws it).
    small = mask(SECRET, Purpose.SELF, 1, [(4096,)], 2**4)[0]
    assert set(small.tolist()) == set(range(16))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((Purpose.PAIRWISE, 1), (Purpose.PAIRWISE, 2)),  # same key material, next round
        ((Purpose.PAIRWISE, 1), (Purpose.SELF, 1)),  # same round, other purpose
        ((Purpose.SELF, 0), (Purpose.SELF, 2**40)),
    ],
)
def test_no_mask_is_reused_across_rounds_or_purposes(a, b):
    x = mask(SECRET, *a, [(100_000,)], 2**32)[0]
    y = mask(SECRET, *b, [(100_000,)], 2**32)[0]

    # Independent uniform 32-bit values agree with probability 2^-32 each: about 0 here.
    assert int((x == y).sum()) <= 1
    # No shifted copy either (a keystream reused at another offset).
    assert not np.isin(x[:64], y).all()


def test_the_whole_secret_matters():
    """Flower XOR-folds the secret to 32 bits: secrets equal after folding give one mask."""
    other = bytearray(SECRET)
    other[0] ^= 1
    other[4] ^= 1  # the same 32-bit XOR fold
    x = mask(SECRET, Purpose.SELF, 1, [(1000,)], 2**32)[0]
    y = mask(bytes(other), Purpose.SELF, 1, [(1000,)], 2**32)[0]
    assert int((x == y).sum()) <= 1


def test_narrow_moduli_keep_values_in_range():
    for bits in (1, 8, 20, 31):
        got = mask(SECRET, Purpose.SELF, 1, SHAPES, 2**bits)
        assert [a.shape for a in got] == SHAPES
        assert max(int(a.max()) for a in got) < 2**bits


@pytest.mark.parametrize("mod_range", [0, 1, 3, 2**33, 10**9, True])
def test_a_modulus_that_is_not_a_power_of_two_up_to_2_32_is_refused(mod_range):
    with pytest.raises(UpdateError, match="modulus"):
        mask(SECRET, Purpose.SELF, 1, SHAPES, mod_range)


def test_a_short_secret_is_refused():
    with pytest.raises(UpdateError, match="at least 32 bytes"):
        mask(b"\x01" * 4, Purpose.SELF, 1, SHAPES, 2**32)


def test_pairwise_secret_is_the_same_from_both_sides_and_masks_cancel():
    a, b = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    sa = masks.pairwise_secret(private_key_to_bytes(a), public_key_to_bytes(b.public_key()))
    sb = masks.pairwise_secret(private_key_to_bytes(b), public_key_to_bytes(a.public_key()))
    assert sa == sb and len(sa) == 48

    x = [np.arange(10, dtype=np.uint64)]
    m = mask(sa, Purpose.PAIRWISE, 5, [(10,)], 2**32)
    masked = masks.subtract(
        masks.add(x, m, 2**32), mask(sb, Purpose.PAIRWISE, 5, [(10,)], 2**32), 2**32
    )
    assert masked[0].tolist() == list(range(10))
