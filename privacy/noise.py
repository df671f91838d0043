"""Where DP-SGD's randomness comes from: a CSPRNG the coordinator cannot predict.

DP-SGD is private only if nobody who sees its output knows the noise that was added
or which records were sampled. A device therefore draws both from
:class:`SecureRandom`: a 256-bit key from the operating system (``os.urandom``)
expanded with ChaCha20 (the keystream is the encryption of zeros under a fresh
random nonce). The key never leaves the process: it is not logged, not in the
ledger, not pickled, and no seed in the run config reaches it.

:class:`SeededRandom` has the same interface and algorithms, but its key is a hash
of an integer seed, so every draw is reproducible. It is for research simulations
(``privacy.reproducible_noise``) only: whoever knows the seed knows the noise, and ε
does not hold against them.

Both give:

- :meth:`~ChaChaRandom.uniform`: doubles in [0, 1), each from 53 random bits;
- :meth:`~ChaChaRandom.bernoulli`: Bernoulli(q) draws (Poisson sampling of records);
- :meth:`~ChaChaRandom.gaussian`: N(0, std²) draws built to resist the
  floating-point attacks on Gaussian sampling (see its docstring).

numpy and ``cryptography`` only: no torch, no global RNG.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Protocol, runtime_checkable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedlora.errors import PrivacyError

SECURE_SOURCE = "os-csprng-chacha20"
"""What :class:`SecureRandom` is called in a privacy report: OS-seeded ChaCha20."""

SEEDED_SOURCE = "seeded-chacha20"
"""What :class:`SeededRandom` is called in a privacy report: ChaCha20 keyed by a seed."""

KEY_BYTES = 32
"""ChaCha20's key: 256 bits."""

NONCE_BYTES = 16
"""``cryptography``'s ChaCha20 nonce: a 32-bit block counter then a 96-bit nonce."""

REKEY_BYTES = 1 << 32
"""A stream is restarted under a new nonce after this much keystream (4 GiB, a
sixty-fourth of what one nonce covers), so no keystream block can repeat however long
a source is used. One DP-SGD step of the default adapter draws about 1.2 MB."""

_SEED_DOMAIN = b"fedlora.privacy.noise.SeededRandom.v1\x00"
_BITS_53 = 2.0**-53


@runtime_checkable
class RandomSource(Protocol):
    """What DP-SGD draws its Poisson batches and Gaussian noise from."""

    #: The name a privacy report gives this kind of source.
    source: str
    #: Whether anyone but this process can regenerate the draws (from a seed).
    reproducible: bool

    def uniform(self, n: int) -> np.ndarray: ...

    def bernoulli(self, p: float, n: int) -> np.ndarray: ...

    def gaussian(self, n: int, std: float) -> np.ndarray: ...


def _count(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise PrivacyError(f"the number of draws must be an int >= 0, got {n!r}")
    return int(n)


class ChaChaRandom:
    """Draws from a ChaCha20 keystream; see :class:`SecureRandom` and :class:`SeededRandom`."""

    source = "chacha20"
    reproducible = False

    def __init__(self, key: bytes, nonce: bytes) -> None:
        if len(key) != KEY_BYTES or len(nonce) != NONCE_BYTES:
            raise PrivacyError(
                f"ChaCha20 needs a {KEY_BYTES}-byte key and a {NONCE_BYTES}-byte nonce"
            )
        self.__key = key
        self._segment = 0
        self._start(nonce)

    def _start(self, nonce: bytes) -> None:
        self._encryptor = Cipher(algorithms.ChaCha20(self.__key, nonce), mode=None).encryptor()
        self._left = REKEY_BYTES

    def _next_nonce(self) -> bytes:
        raise NotImplementedError

    def random_bytes(self, n: int) -> bytes:
        """``n`` bytes of keystream (ChaCha20 applied to zeros)."""
        n = _count(n)
        out = []
        while n > 0:
            if self._left == 0:
                self._segment += 1
                self._start(self._next_nonce())
            take = min(n, self._left)
            out.append(self._encryptor.update(bytes(take)))
            self._left -= take
            n -= take
        return b"".join(out)

    def uniform(self, n: int) -> np.ndarray:
        """``n`` float64 in [0, 1): k · 2⁻⁵³ for a uniform 53-bit integer k (every value exact)."""
        n = _count(n)
        words = np.frombuffer(self.random_bytes(8 * n), dtype="<u8")
        return (words >> np.uint64(11)).astype(np.float64) * _BITS_53

    def bernoulli(self, p: float, n: int) -> np.ndarray:
        """``n`` booleans, each True with probability ``p`` (to within 2⁻⁵³): ``uniform < p``."""
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise PrivacyError(f"a Bernoulli probability must be in [0, 1], got {p!r}")
        return self.uniform(n) < p

    def standard_normal(self, n: int) -> np.ndarray:
        """``n`` N(0, 1) float64 draws by Box–Muller on this source's uniforms.

        A pair of uniforms (u₁, u₂) gives two normals √(−2 ln(1 − u₁))·(cos, sin)(2π u₂);
        1 − u₁ is in [2⁻⁵³, 1], so the logarithm is finite (|z| ≤ 8.58).
        """
        n = _count(n)
        half = (n + 1) // 2
        u = self.uniform(2 * half)
        radius = np.sqrt(-2.0 * np.log1p(-u[:half]))
        angle = (2.0 * math.pi) * u[half:]
        return np.concatenate((radius * np.cos(angle), radius * np.sin(angle)))[:n]

    def gaussian(self, n: int, std: float) -> np.ndarray:
        """``n`` N(0, std²) float64 draws: (std / 2) · (Z₁ + Z₂ + Z₃ + Z₄), Zᵢ ~ N(0, 1).

        Why a sum of four: a Gaussian sampled in floating point is not the continuous
        distribution the DP proof assumes. Mironov (2012) showed, for the Laplace
        mechanism, that the set of floats a sampler can output depends on the value it
        was added to, so an output can reveal the unnoised value; Holohan & Braghin
        (2021, "Secure random sampling in differential privacy", §5) showed the same for
        Box–Muller and other Gaussian samplers, where an output pins down the 53-bit
        uniforms that made it. Their mitigation, which Opacus' ``secure_mode`` uses, is
        to add 2n independent normal samples scaled by 1/√(2n) (the variance is
        unchanged): recovering the uniforms then takes about 2^(53·(2n−1)) work instead
        of 2^53. Opacus picks n = 2 (four samples, std/2), 2^159 work; so do we.

        It is a mitigation of a known attack, not a proof that the floating-point
        mechanism is exactly (ε, δ)-DP; the accountant analyses the ideal Gaussian.
        ``std`` 0 gives zeros without drawing (as Opacus does).
        """
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not std >= 0:
            raise PrivacyError(f"a standard deviation must be a number >= 0, got {std!r}")
        n = _count(n)
        if std == 0:
            return np.zeros(n)
        total = self.standard_normal(n)
        for _ in range(3):
            total += self.standard_normal(n)
        return total * (std / 2.0)

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}(source={self.source!r})"

    def __getstate__(self) -> object:
        raise TypeError(f"a {type(self).__name__} is not pickled: its key stays in this process")


class SecureRandom(ChaChaRandom):
    """A fresh OS-seeded CSPRNG: key and nonce from ``os.urandom``, unknown to anyone else.

    Two instances draw independent streams, even in the same process with the same
    inputs; nothing about the run (its seed, the device, the round) goes into them.
    """

    source = SECURE_SOURCE
    reproducible = False

    def __init__(self) -> None:
        super().__init__(os.urandom(KEY_BYTES), os.urandom(NONCE_BYTES))

    def _next_nonce(self) -> bytes:
        return os.urandom(NONCE_BYTES)


class SeededRandom(ChaChaRandom):
    """ChaCha20 keyed by SHA-256 of ``seed``: the same draws for the same seed, every time.

    Research simulations only (``privacy.reproducible_noise``): anyone who knows the
    seed can regenerate the noise and subtract it, so the DP guarantee does not hold
    against them.
    """

    source = SEEDED_SOURCE
    reproducible = True

    def __init__(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise PrivacyError(f"a noise seed must be an int >= 0, got {seed!r}")
        seed_bytes = int(seed).to_bytes((int(seed).bit_length() + 7) // 8 or 1, "big")
        super().__init__(hashlib.sha256(_SEED_DOMAIN + seed_bytes).digest(), self._nonce(0))

    def _nonce(self, segment: int) -> bytes:
        # Counter word 0, then a 96-bit nonce naming the segment: streams never overlap.
        return bytes(4) + segment.to_bytes(12, "little")

    def _next_nonce(self) -> bytes:
        return self._nonce(self._segment)
