"""The device's side of fedlora's SecAgg+ (:mod:`fedlora.secagg`): a Flower mod.

Flower 1.39's ``secaggplus_mod`` is kept for its stage checks, its setup (two P-384 key
pairs) and its unmask replies. Two stages are fedlora's, because what changes is inside
Flower's private functions: key sharing (:func:`share_keys`: Shamir shares of the
self-mask seed and of the first private key's raw scalar, split by
:mod:`fedlora.secagg.shamir` and sealed with ChaCha20-Poly1305,
:mod:`fedlora.secagg.shares`) and the masked vector
(:func:`collect_masked_vectors`: Flower's mod quantizes with numpy's global RNG, masks
with ``pseudo_rand_gen`` and sends int64). Message formats and stage names are
Flower's, so the coordinator's bookkeeping reads them as before.

Stochastic rounding draws from the device's OS CSPRNG, or, for a simulated device of a
run with ``privacy.reproducible_noise``, from a generator seeded by (run seed, device,
round) with its own domain, so a seeded SecAgg+ simulation reproduces bit for bit.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.app.typing import ConfigRecordValues
from flwr.client.mod.secure_aggregation.secaggplus_mod import (
    SecAggPlusState,
    _setup,
    _unmask,
    check_configs,
    check_stage,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.compat.common import recorddict_compat as compat

from fedlora.config import FedloraConfig, config_from_run_config
from fedlora.ddp.encoding import encode as ddp_encode
from fedlora.ddp.wire import Wired, from_fit_config
from fedlora.errors import UpdateError
from fedlora.protocol import FIT_CONFIG_RECORD
from fedlora.secagg import masks, packing, shares
from fedlora.secagg.quantize import UniformSource, encode
from fedlora.secagg.shamir import create_shares

#: Where a device's stochastic rounding draws from in a round: (context, round) → source.
RoundingSource = Callable[[Context, int], UniformSource]

_ROUNDING_DOMAIN = b"fedlora/secagg/v1/rounding/"


def rounding_seed(seed: int, device_index: int, server_round: int) -> int:
    """The seed of a simulated device's rounding in one round (reproducible runs only);
    its own domain, so it never equals the seed of the device's DP noise."""
    material = _ROUNDING_DOMAIN + b"/".join(
        str(v).encode() for v in (seed, device_index, server_round)
    )
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "big")


def rounding_source(cfg: FedloraConfig | None) -> RoundingSource:
    """The OS CSPRNG, or a seeded generator for a *simulated* device (``partition-id``,
    no ``data-path``) of a run with ``privacy.reproducible_noise``, as for DP noise
    (:func:`fedlora.client.device_client.round_randomness`)."""

    def source(ctxt: Context, server_round: int) -> UniformSource:
        # Imported here: fedlora.privacy loads the accountants, and three of SecAgg+'s four
        # messages never get this far (see fedlora.client.app).
        from fedlora.privacy.noise import SecureRandom, SeededRandom

        resolved = cfg if cfg is not None else config_from_run_config(dict(ctxt.run_config))
        node = ctxt.node_config
        pid = node.get("partition-id")
        simulated = pid is not None and not node.get("data-path")
        if resolved.privacy.reproducible_noise and simulated:
            return SeededRandom(rounding_seed(resolved.seed, int(cast(int, pid)), server_round))
        return SecureRandom()

    return source


def fedlora_secaggplus_mod(
    rounding: RoundingSource,
) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """Flower's ``secaggplus_mod`` with fedlora's masked-vector stage."""

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        if RECORD_KEY_STATE not in ctxt.state.config_records:
            ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord({})
        state = SecAggPlusState(**ctxt.state.config_records[RECORD_KEY_STATE])
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        check_stage(state.current_stage, configs)
        state.current_stage = cast(str, configs.pop(Key.STAGE))
        check_configs(state.current_stage, configs)

        out_content = RecordDict()
        if state.current_stage == Stage.SETUP:
            state.nid = msg.metadata.dst_node_id
            res = _setup(state, configs)
        elif state.current_stage == Stage.SHARE_KEYS:
            res = share_keys(state, configs, _round_of(msg))
        elif state.current_stage == Stage.COLLECT_MASKED_VECTORS:
            server_round = _round_of(msg)
            out_msg = call_next(msg, ctxt)
            out_content = out_msg.content
            fitres = compat.recorddict_to_fitres(out_content, keep_input=True)
            # Only the request's config: the parameters were decoded once, for training.
            fit_config = dict(msg.content.config_records.get(FIT_CONFIG_RECORD, {}))
            res = collect_masked_vectors(
                state,
                configs,
                parameters_to_ndarrays(fitres.parameters),
                fitres.num_examples,
                server_round,
                rounding(ctxt, server_round),
                device_level=from_fit_config(fit_config),
            )
            for arr_record in out_content.array_records.values():
                arr_record.clear()
        elif state.current_stage == Stage.UNMASK:
            res = _unmask(state, configs)
        else:  # check_stage refuses anything else first
            raise ValueError(f"Unknown SecAgg+ stage: {state.current_stage}")

        ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord(state.to_dict())
        out_content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(res, False)
        return Message(out_content, reply_to=msg)

    return mod


def _round_of(msg: Message) -> int:
    """The round a SecAgg+ message belongs to: Flower's workflow sends it as the group id."""
    try:
        return int(msg.metadata.group_id)
    except ValueError:
        raise UpdateError(
            f"a SecAgg+ message with group id {msg.metadata.group_id!r}, not a round number"
        ) from None


def share_keys(
    state: SecAggPlusState, configs: ConfigRecord, server_round: int
) -> dict[str, ConfigRecordValues]:
    """Flower's key sharing (its checks, a fresh 256-bit self-mask seed, Shamir shares of
    it and of the first private key for every neighbour) with the key's 48-byte scalar
    shared instead of its PEM text, and each neighbour's shares sealed with
    ChaCha20-Poly1305 (:mod:`fedlora.secagg.shares`) instead of Fernet."""
    pairs = cast(dict[str, list[bytes]], configs)
    state.public_keys_dict = {int(nid): (pk[0], pk[1]) for nid, pk in pairs.items()}
    if len(state.public_keys_dict) < state.threshold:
        raise ValueError("Available neighbours number smaller than threshold")
    keys = [k for pair in state.public_keys_dict.values() for k in pair]
    if len(set(keys)) != len(keys):
        raise ValueError("Some public keys are identical")
    if state.public_keys_dict.get(state.nid) != (state.pk1, state.pk2):
        raise ValueError("Own public keys are displayed in dict incorrectly, should not happen!")
    state.rd_seed = os.urandom(32)
    seed_shares = create_shares(state.rd_seed, state.threshold, state.share_num)
    sk1_shares = create_shares(shares.private_scalar(state.sk1), state.threshold, state.share_num)
    dsts: list[int] = []
    ciphertexts: list[bytes] = []
    sk2 = shares.private_key(state.sk2)  # parsed once, not once a neighbour
    for idx, (nid, (_, pk2)) in enumerate(state.public_keys_dict.items()):
        if nid == state.nid:
            state.rd_seed_share_dict[nid] = seed_shares[idx]
            state.sk1_share_dict[nid] = sk1_shares[idx]
            continue
        key = shares.channel_key(sk2, pk2)
        state.ss2_dict[nid] = key
        plaintext = share_keys_plaintext_concat(state.nid, nid, seed_shares[idx], sk1_shares[idx])
        dsts.append(nid)
        ciphertexts.append(shares.seal(key, plaintext, server_round, state.nid, nid))
    return {Key.DESTINATION_LIST: dsts, Key.CIPHERTEXT_LIST: ciphertexts}


def collect_masked_vectors(
    state: SecAggPlusState,
    configs: ConfigRecord,
    update: list,
    num_examples: int,
    server_round: int,
    source: UniformSource,
    device_level: Wired | None = None,
) -> dict[str, ConfigRecordValues]:
    """Store the neighbours' shares, then send ``[w, w·update]`` quantized and masked,
    packed at the modulus' width.

    With ``device_level`` (the round's distributed-DP parameters, :mod:`fedlora.ddp.wire`)
    the vector is ``[1, encoding]`` instead: the whole update clipped, rotated, rounded
    onto the grid with this device's share of discrete Gaussian noise added
    (:func:`fedlora.ddp.encoding.encode`), drawing from ``source``."""
    ciphertexts = cast(list[bytes], configs[Key.CIPHERTEXT_LIST])
    srcs = cast(list[int], configs[Key.SOURCE_LIST])
    if len(ciphertexts) + 1 < state.threshold:
        raise ValueError("Not enough available neighbour clients.")
    neighbours = []
    for src, ciphertext in zip(srcs, ciphertexts, strict=True):
        if src not in state.ss2_dict:
            raise ValueError(f"Node {state.nid}: a key share from {src}, not a neighbour")
        plaintext = shares.open_sealed(
            state.ss2_dict[src], ciphertext, server_round, src, state.nid
        )
        actual_src, dst, seed_share, sk1_share = share_keys_plaintext_separate(plaintext)
        if src != actual_src or dst != state.nid:
            raise ValueError(
                f"Node {state.nid}: a key share from {actual_src} to {dst} arrived as {src}'s"
            )
        state.rd_seed_share_dict[src] = seed_share
        state.sk1_share_dict[src] = sk1_share
        neighbours.append(src)

    mod_range = state.mod_range
    if device_level is not None:
        params, rotation_seed, _ = device_level
        if params.modulus != mod_range:
            raise ValueError(
                f"Node {state.nid}: the noise was planned for 2^{params.bits}, "
                f"SecAgg+ sums mod {mod_range}"
            )
        flat = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in update])
        vector = [
            np.array([1], dtype=np.uint64),
            ddp_encode(flat, params, rotation_seed, source).astype(np.uint64),
        ]
    else:
        vector = encode(
            update,
            num_examples,
            max_weight=state.max_weight,
            clipping_range=state.clipping_range,
            target_range=state.target_range,
            source=source,
        )
    shapes = [a.shape for a in vector]
    vector = masks.add(
        vector,
        masks.mask(state.rd_seed, masks.Purpose.SELF, server_round, shapes, mod_range),
        mod_range,
    )
    sk1 = shares.private_key(state.sk1)
    for nid in neighbours:
        secret = masks.pairwise_secret(sk1, state.public_keys_dict[nid][0])
        pairwise = masks.mask(secret, masks.Purpose.PAIRWISE, server_round, shapes, mod_range)
        if state.nid > nid:
            vector = masks.add(vector, pairwise, mod_range)
        else:
            vector = masks.subtract(vector, pairwise, mod_range)
    return {Key.MASKED_PARAMETERS: packing.pack(vector, mod_range)}
