"""The coordinator's side of fedlora's SecAgg+ (:mod:`fedlora.secagg`): a workflow.

:class:`FedloraSecAggPlus` is :class:`fedlora.server.rounds.ReportingSecAggPlus` (Flower
1.39's workflow with per-round share graphs and two fixes) with its last two stages
replaced, because what changes happens inside them:

- **collect_masked_vectors**: each payload is unpacked at the modulus' width
  (:mod:`fedlora.secagg.packing`; a wrong size is refused), and *before* anything is
  unmasked every device's plaintext claims go through the strategy's checks
  (``screen``). A device whose claims fail, or whose payload is malformed, is a *liar*:
  its masked vector is left out of the sum (the sum is additive mod the modulus, so
  that is the same as subtracting it) and it is treated as a dropout from here on.
- **unmask**: the survivors are asked, as for any dropout, for the shares of a liar's
  first private key (to remove its pairwise masks from their vectors) and never for the
  shares of its self-mask seed; masks are regenerated with :mod:`fedlora.secagg.masks`.
  A liar still holds shares of its neighbours' secrets and is asked for them like any
  share holder (its own seed stays on its "dead" list), so a liar does not also count
  as a lost share holder.
  The round then aggregates exactly the honest survivors' weighted mean.

Stage names, message formats and the order of the stages are Flower's, so
:class:`fedlora.server.rounds.RoundGrid` counts and bounds them as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, cast

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import LegacyContext
from flwr.server.client_proxy import ClientProxy
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedlora.errors import UpdateError
from fedlora.secagg import masks, packing, quantize, shamir
from fedlora.secagg.shares import private_key
from fedlora.server.ddp import DeviceLevelDP
from fedlora.server.rounds import ReportingSecAggPlus, current_round

log = logging.getLogger("server")

#: ``screen(round, results, malformed)`` → node ids to leave out of the sum. ``malformed``
#: maps a node whose masked payload was refused to why; the strategy checks every result's
#: claims (recording the privacy events of those that hold) and answers with the liars.
Screen = Callable[[int, list[tuple[ClientProxy, FitRes]], Mapping[int, str]], set[int]]


def adapter_shapes(context: LegacyContext) -> list[tuple[int, ...]]:
    """The shapes of the round's global adapter tensors (what every masked vector holds,
    after its weight)."""
    record = context.state.array_records[MAIN_PARAMS_RECORD]
    params = compat.arrayrecord_to_parameters(record, keep_input=True)
    return [tuple(a.shape) for a in parameters_to_ndarrays(params)]


def holders_suffice(state: WorkflowState, holders: set[int]) -> bool:
    """Whether every device keeps at least the threshold of its share holders in ``holders``."""
    for nid in state.sampled_node_ids:
        if len(state.nid_to_neighbours[nid] & holders) < state.threshold:
            log.error("node %s keeps fewer than %d share holders", nid, state.threshold)
            return False
    return True


class FedloraSecAggPlus(ReportingSecAggPlus):
    """SecAgg+ with CSPRNG masks, packed uint32 payloads, and liars taken out before unmask.

    ``screen``: the strategy's claim checks (:data:`Screen`); None leaves out only the
    devices whose payload is malformed. :attr:`liars` is the current round's.
    """

    def __init__(
        self,
        *args: Any,
        screen: Screen | None = None,
        device_level: DeviceLevelDP | None = None,
        **kwargs: Any,
    ) -> None:
        if device_level is not None:
            kwargs["modulus_range"] = device_level.params.modulus
            # Flower's quantization is not used (devices send the DDP encoding); its range
            # only has to be below the modulus for Flower's checks.
            kwargs["quantization_range"] = device_level.params.modulus // 2
        super().__init__(*args, **kwargs)
        #: Device-level DP (:mod:`fedlora.server.ddp`): vectors are ``[count, encoding]``
        #: mod 2^bits, a sum of fewer than its minimum survivors is never unmasked, and
        #: the unmasked sum is decoded by it.
        self.device_level = device_level
        if self.modulus_range > 2**masks.MAX_MODULUS_BITS:
            raise ValueError(
                f"fedlora's SecAgg+ needs a modulus of at most 2^32, got {self.modulus_range}"
            )
        self._screen = screen
        #: Node id → why it was left out of the current round's sum.
        self.liars: dict[int, str] = {}
        self._helpers: set[int] = set()  # liars asked for their neighbours' shares at unmask

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        self.liars = {}
        return super().setup_stage(grid, context, state)

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        rnd = current_round(context)

        def make(nid: int) -> Message:
            content = state.nid_to_fitins[nid]
            content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(
                {
                    Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                    Key.CIPHERTEXT_LIST: state.forward_ciphertexts[nid],
                    Key.SOURCE_LIST: state.forward_srcs[nid],
                }
            )
            return Message(
                content=content, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=str(rnd)
            )

        msgs = list(
            grid.send_and_receive([make(n) for n in state.active_node_ids], timeout=self.timeout)
        )
        del state.forward_ciphertexts, state.forward_srcs, state.nid_to_fitins
        ddp = self.device_level
        shapes = ddp.vector_shapes if ddp is not None else [(1,), *adapter_shapes(context)]
        vectors: dict[int, list[np.ndarray]] = {}
        malformed: dict[int, str] = {}
        for msg in msgs:
            if msg.has_error():
                state.failures.append(Exception(msg.error))
                continue
            nid = msg.metadata.src_node_id
            try:
                fitres = compat.recorddict_to_fitres(msg.content, True)
            except Exception as exc:  # arbitrary content from the network: any parse error
                state.failures.append(Exception(f"node {nid}: no training reply ({exc!r})"))
                continue
            state.legacy_results.append((state.nid_to_proxies[nid], fitres))
            try:
                blobs = msg.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
                vectors[nid] = packing.unpack(cast(list[bytes], blobs), shapes, state.mod_range)
            except (KeyError, UpdateError) as exc:
                malformed[nid] = f"its masked vector is malformed: {exc}"
        refused = set(malformed)
        if self._screen is not None:
            refused |= self._screen(rnd, list(state.legacy_results), malformed)
        self.liars = {
            nid: malformed.get(nid, "its claims were rejected") for nid in sorted(refused)
        }
        if self.liars:
            log.warning(
                "round %d: %d device(s) left out of the masked sum: %s",
                rnd,
                len(self.liars),
                self.liars,
            )
        state.active_node_ids = set(vectors) - refused
        total: list[np.ndarray] | None = None
        for nid in sorted(state.active_node_ids):
            total = (
                vectors[nid] if total is None else masks.add(total, vectors[nid], state.mod_range)
            )
        if total is not None:
            state.aggregate_ndarrays = total
        # A liar is out of the sum but still holds its neighbours' shares: it is asked for
        # them at unmask like any share holder (never for its own seed's: it is "dead").
        self._helpers = refused
        ok = bool(state.active_node_ids) and holders_suffice(state, state.active_node_ids | refused)
        if ok and ddp is not None:
            why = ddp.enough(len(state.active_node_ids))
            if why is not None:
                log.error("round %d: %s", rnd, why)
                ok = False
        elif ok and not quantize.fits(
            len(state.active_node_ids), state.quantization_range, state.mod_range
        ):
            log.error(
                "round %d: %d vectors would overflow the modulus", rnd, len(state.active_node_ids)
            )
            ok = False
        if not ok:
            self._halt(context, "collect_masked_vectors", state)
        return ok

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        rnd = current_round(context)
        summed = set(state.active_node_ids)  # the vectors in the sum
        dead = state.sampled_node_ids - summed  # dropouts after key sharing, and liars

        def make(nid: int) -> Message:
            neighbours = state.nid_to_neighbours[nid]
            record = ConfigRecord(
                {
                    Key.STAGE: Stage.UNMASK,
                    Key.ACTIVE_NODE_ID_LIST: sorted(neighbours & summed),
                    Key.DEAD_NODE_ID_LIST: sorted(neighbours & dead),
                }
            )
            return Message(
                content=RecordDict({RECORD_KEY_CONFIGS: record}),
                dst_node_id=nid,
                message_type=MessageType.TRAIN,
                group_id=str(rnd),
            )

        asked = summed | self._helpers
        msgs = list(grid.send_and_receive([make(n) for n in sorted(asked)], timeout=self.timeout))
        state.active_node_ids = {m.metadata.src_node_id for m in msgs if not m.has_error()}
        shares: dict[int, list[bytes]] = {nid: [] for nid in state.sampled_node_ids}
        for msg in msgs:
            if msg.has_error():
                state.failures.append(Exception(msg.error))
                continue
            try:
                record = msg.content.config_records[RECORD_KEY_CONFIGS]
                owners = cast(list[int], record[Key.NODE_ID_LIST])
                given = list(zip(owners, cast(list[bytes], record[Key.SHARE_LIST]), strict=True))
            except (KeyError, TypeError, ValueError) as exc:  # a reply that is not shares
                nid = msg.metadata.src_node_id
                state.active_node_ids.discard(nid)
                state.failures.append(Exception(f"node {nid}: unreadable key shares ({exc!r})"))
                continue
            for owner, share in given:
                if owner in shares:
                    shares[owner].append(share)
        if any(len(s) < state.threshold for s in shares.values()):
            self._halt(context, "unmask", state)
            return False
        try:
            total = self._unmask(rnd, state, summed, shares)
        except (ValueError, UpdateError) as exc:  # shares that do not rebuild a secret
            log.error("round %d: SecAgg+ could not unmask the sum: %s", rnd, exc)
            self._halt(context, "unmask", state)
            return False
        if self.device_level is not None:
            # The coordinator now holds the noisy sum: its devices are charged for it
            # before anything else can go wrong (a count slot that does not decode).
            charge = getattr(context.strategy, "charge_device_level", None)
            if callable(charge):
                charge(rnd, sorted(summed))
            try:
                mean = self.device_level.decode(rnd, total, len(summed))
            except UpdateError as exc:
                log.error("round %d: %s", rnd, exc)
                self._halt(context, "unmask", state)
                return False
        else:
            mean = quantize.decode(
                total,
                len(summed),
                clipping_range=state.clipping_range,
                target_range=state.quantization_range,
            )
        parameters = ndarrays_to_parameters(mean)
        for _, fitres in state.legacy_results:
            fitres.parameters = parameters
        strategy = context.strategy
        aggregated, metrics = strategy.aggregate_fit(rnd, state.legacy_results, state.failures)  # type: ignore[arg-type]
        if aggregated:
            context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                aggregated, True
            )
            context.history.add_metrics_distributed_fit(server_round=rnd, metrics=metrics)
        return True

    @staticmethod
    def _unmask(
        rnd: int, state: WorkflowState, summed: set[int], shares: dict[int, list[bytes]]
    ) -> list[np.ndarray]:
        """The sum of the summed devices' quantized vectors: their self masks and the dead
        devices' pairwise masks (rebuilt from the shares) taken out."""
        total = state.aggregate_ndarrays
        del state.aggregate_ndarrays
        mod = state.mod_range
        shapes = [a.shape for a in total]
        for nid in sorted(shares):
            secret = shamir.combine_shares(shares[nid], state.threshold)
            if nid in summed:
                total = masks.subtract(
                    total, masks.mask(secret, masks.Purpose.SELF, rnd, shapes, mod), mod
                )
                continue
            key = private_key(secret)  # rebuilt once, not once a neighbour
            for other in sorted(state.nid_to_neighbours[nid] - {nid}):
                pk1 = state.nid_to_publickeys[other][0]
                pairwise = masks.mask(
                    masks.pairwise_secret(key, pk1), masks.Purpose.PAIRWISE, rnd, shapes, mod
                )
                # ``other`` added the mask if its id is the larger, else subtracted it.
                total = (masks.add if nid > other else masks.subtract)(total, pairwise, mod)
        return total
