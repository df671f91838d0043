"""fedlora's SecAgg+: the pieces the device's mod and the coordinator's workflow share.

The protocol is Flower 1.39's SecAgg+ (Bell et al. 2020), stage for stage and message
for message (setup, share_keys, collect_masked_vectors, unmask; Flower's config keys),
with three parts replaced:

- :mod:`fedlora.secagg.masks`: masks from ChaCha20 keyed by HKDF-SHA256 of the full
  secret (the raw ECDH secret of two devices' first key pairs, or the 256-bit self-mask
  seed), domain-separated by purpose and round, instead of Flower's
  ``pseudo_rand_gen`` (the secret XOR-folded to 32 bits, expanded by
  ``np.random.RandomState``);
- :mod:`fedlora.secagg.quantize`: stochastic rounding from an injected generator
  (the OS CSPRNG, or a seeded one under ``privacy.reproducible_noise``), not numpy's
  global RNG;
- :mod:`fedlora.secagg.packing`: masked values travel at the modulus' width (uint32
  for 2³²), not as int64 ``.npy`` arrays, and a payload of the wrong size is refused.

:mod:`fedlora.secagg.version` names the protocol a device speaks; the coordinator
refuses a fleet that does not all speak it.
"""

from __future__ import annotations

PROTOCOL_KEY = "secagg_protocol"
"""The property a device reports at discovery (``get_properties``): the SecAgg+ it speaks."""

PROTOCOL_VERSION = 1
"""fedlora-SecAgg+ v1: ChaCha20 masks, uint32 packing. Flower's SecAgg+ has no version
(a device without :data:`PROTOCOL_KEY` speaks it)."""
