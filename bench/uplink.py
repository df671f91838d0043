"""Uplink payload of one device in one round, plain vs SecAgg+, from Flower's own primitives.

Used when a run's metrics rows do not count bytes themselves (no ``bytes_up_per_device``).
Nothing is estimated from formulas: each SecAgg+ stage's reply is built with the
functions Flower 1.39's ``secaggplus_mod`` calls (key pairs, Shamir shares, AES-GCM
ciphertexts, quantization and masking of the update) on an update of the adapter's
shapes, and the bytes of the values it sends are counted:

* setup: the two public keys;
* share keys: one destination id (8 B) and one ciphertext per neighbour;
* collect masked vectors: the masked, quantized update (``ndarray_to_bytes``);
* unmask: one node id (8 B) and one Shamir share per surviving neighbour (no dropouts).

The plain round's uplink is the fp32 update as Flower serializes it. Record keys,
message metadata and transport framing (gRPC, TLS) are not counted in either: this
is the payload a device sends, not the bytes on the wire (``bench/deployment.py``
measures those).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ID_BYTES = 8  # node ids travel as sint64


def share_parameters(
    sampled: int,
    num_shares: float | None,
    threshold: float | None,
    dropout_rate: float = 0.1,
) -> tuple[int, int]:
    """``(share_num, threshold)`` as Flower 1.39's SecAggPlusWorkflow derives them, or for
    None as fedlora's sparse SecAgg+ graph sets them (``fedlora.server.secagg_graph``)."""
    if num_shares is None or threshold is None:
        from fedlora.server.secagg_graph import share_graph

        return share_graph(sampled, num_shares, threshold, dropout_rate)
    if isinstance(num_shares, float):
        shares = round(num_shares * sampled)
        if shares < sampled and shares % 2 == 0:
            shares += 1
        if shares <= 2:
            shares = sampled
    else:
        shares = int(num_shares)
    need = max(round(threshold * shares), 2) if isinstance(threshold, float) else int(threshold)
    return shares, need


def plain_uplink_bytes(shapes: Sequence[tuple[int, ...]]) -> int:
    """The fp32 update as Flower serializes it (``ndarray_to_bytes`` per tensor)."""
    from flwr.common import ndarray_to_bytes

    return sum(len(ndarray_to_bytes(np.zeros(s, dtype=np.float32))) for s in shapes)


def fp32_bytes(shapes: Sequence[tuple[int, ...]]) -> int:
    """Raw fp32 adapter values: 4 bytes each, no header."""
    return 4 * sum(int(np.prod(s)) for s in shapes)


def secagg_uplink_bytes(
    shapes: Sequence[tuple[int, ...]],
    sampled: int,
    *,
    num_shares: float | None = 1.0,
    reconstruction_threshold: float | None = 0.6,
    dropout_rate: float = 0.1,
    clipping_range: float = 64.0,
    quantization_range: int = 2**22,
    modulus_range: int = 2**32,
    seed: int = 0,
) -> dict[str, Any]:
    """Bytes one device uploads in each SecAgg+ stage of a round of ``sampled`` devices."""
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.crypto.shamir import create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
        encrypt,
        generate_shared_key,
    )
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        parameters_addition,
        parameters_mod,
    )
    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.common.secure_aggregation.secaggplus_utils import (
        pseudo_rand_gen,
        share_keys_plaintext_concat,
    )
    from flwr.supercore.primitives.asymmetric import (
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
    )

    share_num, threshold = share_parameters(
        sampled, num_shares, reconstruction_threshold, dropout_rate
    )
    neighbours = share_num - 1
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    setup = len(public_key_to_bytes(pk1)) + len(public_key_to_bytes(pk2))

    seed_shares = create_shares(b"\0" * 32, threshold, share_num)
    key_shares = create_shares(private_key_to_bytes(sk1), threshold, share_num)
    _, other_pk = generate_key_pairs()
    shared = generate_shared_key(sk2, other_pk)
    plaintext = share_keys_plaintext_concat(1, 2, seed_shares[0], key_shares[0])
    share_keys = neighbours * (ID_BYTES + len(encrypt(shared, plaintext)))

    rng = np.random.default_rng(seed)
    update = [rng.normal(0.0, 0.05, size=s).astype(np.float32) for s in shapes]
    quantized = quantize(update, clipping_range, quantization_range)
    quantized = factor_combine(quantization_range, quantized)  # the weight rides along
    mask = pseudo_rand_gen(b"\1" * 32, modulus_range, [a.shape for a in quantized])
    masked = parameters_mod(parameters_addition(quantized, mask), modulus_range)
    collect = sum(len(ndarray_to_bytes(a)) for a in masked)
    dtype = str(masked[0].dtype) if masked else "?"

    unmask = share_num * (ID_BYTES + len(seed_shares[0]))  # itself + neighbours, none dead
    total = setup + share_keys + collect + unmask
    return {
        "total": total,
        "stages": {
            "setup": setup,
            "share_keys": share_keys,
            "collect_masked_vectors": collect,
            "unmask": unmask,
        },
        "share_num": share_num,
        "threshold": threshold,
        "masked_dtype": dtype,
    }
