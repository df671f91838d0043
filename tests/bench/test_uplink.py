"""bench/uplink.py: SecAgg+ share parameters as Flower derives them, and payload sizes."""

from __future__ import annotations

import uplink


def test_share_parameters_follow_flowers_workflow() -> None:
    # num_shares 1.0: every sampled device; threshold 0.6 of that, at least 2
    assert uplink.share_parameters(20, 1.0, 0.6) == (20, 12)
    assert uplink.share_parameters(3, 1.0, 0.6) == (3, 2)
    # a fraction below 1 rounds, then an even count below N becomes odd
    assert uplink.share_parameters(20, 0.5, 0.6) == (11, 7)
    assert uplink.share_parameters(4, 0.5, 0.6) == (3, 2)
    # two or fewer shares fall back to all devices
    assert uplink.share_parameters(4, 0.25, 0.6) == (4, 2)
    # integers are taken as counts
    assert uplink.share_parameters(20, 5, 3) == (5, 3)


def test_fp32_and_plain_bytes() -> None:
    shapes = [(8, 16), (16, 8)]
    assert uplink.fp32_bytes(shapes) == 4 * 256
    plain = uplink.plain_uplink_bytes(shapes)
    assert 4 * 256 < plain < 4 * 256 + 2 * 256  # values plus two .npy headers


def test_secagg_payload_is_int64_masked_vector_plus_keys_and_shares() -> None:
    shapes = [(8, 16), (16, 8)]
    est = uplink.secagg_uplink_bytes(shapes, 5)
    stages = est["stages"]
    assert est["masked_dtype"] == "int64"
    assert est["share_num"] == 5 and est["threshold"] == 3
    # the masked vector: 8 bytes per value plus the weight factor and .npy headers
    assert 8 * 256 < stages["collect_masked_vectors"] < 8 * 256 + 4 * 200
    assert stages["share_keys"] > 0 and stages["unmask"] > 0 and stages["setup"] > 0
    assert est["total"] == sum(stages.values())
    # more neighbours: more ciphertexts and shares, same masked vector
    bigger = uplink.secagg_uplink_bytes(shapes, 9)
    assert bigger["stages"]["share_keys"] > stages["share_keys"]
    assert bigger["stages"]["collect_masked_vectors"] == stages["collect_masked_vectors"]


def test_share_parameters_of_the_sparse_graph() -> None:
    # null num_shares / threshold: fedlora's SecAgg+ graph for the dropout rate
    assert uplink.share_parameters(1000, None, None) == (39, 20)
    assert uplink.share_parameters(100, None, None, 0.3) == (100, 51)
