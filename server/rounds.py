"""One federated round with bounded waits, a deadline for updates, and a reason when it fails.

Flower's legacy workflows leave gaps this module closes, by wrapping rather than
forking them:

- **Unbounded waits.** The plain fit workflow waits for training replies with no
  timeout; ``SecAggPlusWorkflow`` passes its one ``timeout`` to all four stages (so
  ``secagg.timeout_s`` does bound each of them). :class:`RoundGrid` is the grid a
  round's workflow talks through: it bounds every wait by ``secagg.timeout_s`` and the
  wait for training replies by what is left of ``training.round_deadline_s``.
- **Silent failures.** A SecAgg+ round that loses too many devices returns without
  telling the strategy, whose metrics row would then read like an empty round, and
  the training replies that did arrive (with the devices' DP-SGD events) are thrown
  away. :class:`ReportingSecAggPlus` hands the strategy the stage, the reason and
  those replies; the global adapter stays as it was and the next round proceeds.
- **Dropouts before key sharing.** Flower 1.39 asks the survivors for the secrets of a
  device lost at setup or key sharing, which they never received, and the round fails
  at unmask; :class:`ReportingSecAggPlus` leaves such devices out of the unmasking.
- **What a round costs.** :class:`RoundGrid` adds up the serialized size of every
  message it sends to devices and of every reply (:func:`message_bytes`).
- **Who was lost where.** :class:`RoundGrid` counts, per stage, the sampled devices
  that did not answer in time or answered with an error, and which devices got the
  training request but did not answer by the deadline (``late``). It also tells the
  coordinator's ledger which training requests went out, so the spend of a device
  whose reply never came is asked for later (:mod:`fedlora.server.reconcile`).

:class:`RoundWorkflow` puts them together around either fit workflow.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.common import FitRes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import message_to_proto
from flwr.server import LegacyContext
from flwr.server.client_proxy import ClientProxy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedlora.protocol import FIT_CONFIG_RECORD
from fedlora.server.exchange import DelegatingGrid
from fedlora.server.secagg_graph import DEFAULT_DROPOUT_RATE, share_graph

log = logging.getLogger("server")

#: The stage name of a plain (not SecAgg+) training request.
PLAIN_FIT_STAGE = "fit"

Workflow = Callable[[Grid, Context], None]


class RoundOutcomes(Protocol):
    """What :class:`RoundWorkflow` tells the strategy (``fedlora.server.strategy.LoraFedAvg``)."""

    def round_failed(
        self,
        server_round: int,
        reason: str,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[BaseException],
    ) -> None: ...

    def note_transport(self, late: int, dropouts: dict[str, int]) -> None: ...

    def note_traffic(self, bytes_down: int, bytes_up: int) -> None: ...

    def note_secagg_graph(self, num_shares: int, threshold: int) -> None: ...


def is_training_request(msg: Message) -> bool:
    """A message that asks a device to train (and so to spend privacy budget)."""
    return (
        msg.metadata.message_type == MessageType.TRAIN
        and FIT_CONFIG_RECORD in msg.content.config_records
    )


def stage_of(msg: Message) -> str:
    """The SecAgg+ stage of a message, ``fit`` for plain training, else its message type."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is not None and isinstance(configs.get(Key.STAGE), str):
        return str(configs[Key.STAGE])
    if msg.metadata.message_type == MessageType.TRAIN:
        return PLAIN_FIT_STAGE
    return msg.metadata.message_type


def message_bytes(msg: Message) -> int:
    """The size of ``msg`` serialized as Flower sends it (protobuf: metadata, content,
    error), without transport framing (gRPC, TLS)."""
    return int(message_to_proto(msg).ByteSize())


def current_round(context: Context) -> int:
    config = context.state.config_records[MAIN_CONFIGS_RECORD]
    return int(cast(int, config[WorkflowKey.CURRENT_ROUND]))


class RoundGrid(DelegatingGrid):
    """The grid of one round: bounded waits, a deadline for training replies, bookkeeping.

    Every ``send_and_receive`` waits ``timeout_s`` whatever its caller asked for (a
    caller's ``None`` would wait forever); one that carries training requests waits
    until ``deadline_s`` after this round started instead, when a deadline is set.
    Replies that come later are never read: those devices are ``late``.
    """

    def __init__(
        self,
        grid: Grid,
        *,
        timeout_s: float,
        deadline_s: float | None = None,
        on_training_request: Callable[[set[int]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(grid)
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self._on_training_request = on_training_request
        self._clock = clock
        self.started = clock()
        #: Nodes sent a training request that did not answer it in time.
        self.late: set[int] = set()
        #: Stage → nodes asked at that stage that did not answer, or answered with an error.
        self.dropouts: Counter[str] = Counter()
        #: Serialized bytes sent to devices, and received from them (:func:`message_bytes`).
        self.bytes_down = 0
        self.bytes_up = 0

    def wait_limit(self, training: bool) -> float:
        """Seconds the next wait may take."""
        if training and self.deadline_s is not None:
            return max(0.0, self.deadline_s - (self._clock() - self.started))
        return self.timeout_s

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        msgs = list(messages)
        if not msgs:
            return []
        asked = {m.metadata.dst_node_id for m in msgs}
        training = any(is_training_request(m) for m in msgs)
        if training and self._on_training_request is not None:
            self._on_training_request(asked)
        stage = stage_of(msgs[0])
        self.bytes_down += sum(message_bytes(m) for m in msgs)
        replies = list(self._grid.send_and_receive(msgs, timeout=self.wait_limit(training)))
        self.bytes_up += sum(message_bytes(r) for r in replies)
        answered = {r.metadata.src_node_id for r in replies}
        ok = {r.metadata.src_node_id for r in replies if not r.has_error()}
        if asked - ok:
            self.dropouts[stage] += len(asked - ok)
        if training:
            self.late |= asked - answered
        return replies


HaltHandler = Callable[[int, str, list[tuple[ClientProxy, FitRes]], list[BaseException]], None]


class ReportingSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, stage for stage, telling ``on_halt`` why a round stopped.

    ``on_halt(round, reason, results, failures)`` gets the training replies that arrived
    before the round stopped (their plaintext metrics carry the devices' DP-SGD events)
    and the error replies. A round whose strategy sampled nobody is not a failure (the
    strategy knows why it sampled nobody) and is not reported.

    ``num_shares`` / ``reconstruction_threshold`` may be None: each round then sets the
    share graph's degree k and threshold t from the number of devices the strategy
    sampled and ``dropout_rate`` (:func:`fedlora.server.secagg_graph.share_graph`), and
    hands Flower those two integers for that round; fractions mean what they mean to
    Flower. :attr:`graph` is the round's (k, t).
    """

    def __init__(
        self,
        num_shares: float | None,
        reconstruction_threshold: float | None,
        *args: Any,
        on_halt: HaltHandler,
        dropout_rate: float = DEFAULT_DROPOUT_RATE,
        **kwargs: Any,
    ) -> None:
        # Flower checks its two numbers here; per-round ones replace them in setup_stage.
        super().__init__(
            1.0 if num_shares is None else num_shares,
            0.6 if reconstruction_threshold is None else reconstruction_threshold,
            *args,
            **kwargs,
        )
        self._shares_policy = (num_shares, reconstruction_threshold, dropout_rate)
        self._on_halt = on_halt
        self._sampled = 0  # devices the current round started with
        #: (k share holders per device, threshold t) of the current round.
        self.graph: tuple[int, int] | None = None

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        strategy = context.strategy
        configure_fit = strategy.configure_fit

        def sampled_then_sized(server_round: int, parameters: Any, client_manager: Any) -> Any:
            # Flower reads num_shares and the threshold right after the strategy samples:
            # size the graph for this round's n, as integers Flower takes as they are.
            chosen = configure_fit(server_round, parameters, client_manager)
            if chosen:
                self.graph = share_graph(len(chosen), *self._shares_policy)
                self.num_shares, self.reconstruction_threshold = self.graph
                note = getattr(strategy, "note_secagg_graph", None)  # RoundOutcomes
                if callable(note):
                    note(*self.graph)
            return chosen

        own = "configure_fit" in vars(strategy)  # an instance attribute, not the method
        strategy.configure_fit = sampled_then_sized  # type: ignore[method-assign]
        try:
            ok = super().setup_stage(grid, context, state)
        finally:
            if own:
                strategy.configure_fit = configure_fit  # type: ignore[method-assign]
            else:
                del strategy.configure_fit
        self._sampled = len(state.sampled_node_ids)
        if not ok and state.nid_to_fitins:
            self._halt(context, "setup", state)
        return ok

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        if not ok:
            self._halt(context, "share_keys", state)
            return ok
        # Flower 1.39 treats every sampled device that is gone by the unmask stage as one
        # whose masks must be removed, and asks the others for its secret key's shares.
        # A device lost before its key shares went out (at setup or here) has none, and
        # none of its masks are in anyone's vector: asking for them makes every survivor
        # fail the unmask stage (a KeyError in secaggplus_mod), so one device going
        # offline during key setup would sink the round. From here on the protocol's
        # participants are the devices whose shares went out, as the devices themselves
        # see it (each masks against exactly the neighbours whose shares it received).
        kept = set(state.active_node_ids)
        state.sampled_node_ids = kept
        for nid in kept:
            state.nid_to_neighbours[nid] &= kept
        return ok

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        before = len(state.failures)
        ok = super().collect_masked_vectors_stage(grid, context, state)
        # Flower 1.39 appends each error reply of this stage twice (once in each of its two
        # loops over the replies, each time as a new Exception around the same error).
        seen: set[int] = set()
        kept = []
        for exc in state.failures[before:]:
            key = id(exc.args[0]) if exc.args else id(exc)
            if key not in seen:
                seen.add(key)
                kept.append(exc)
        state.failures[before:] = kept
        if not ok:
            self._halt(context, "collect_masked_vectors", state)
        return ok

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = super().unmask_stage(grid, context, state)
        if not ok:
            self._halt(context, "unmask", state)
        return ok

    def _halt(self, context: Context, stage: str, state: WorkflowState) -> None:
        reason = halt_reason(
            stage,
            sampled=self._sampled,
            remaining=len(state.active_node_ids),
            threshold=state.threshold,
            num_shares=state.num_shares,
        )
        rnd = current_round(context)
        log.error("round %d: %s", rnd, reason)
        self._on_halt(rnd, reason, list(state.legacy_results), list(state.failures))


def halt_reason(
    stage: str, *, sampled: int, remaining: int, threshold: int, num_shares: int
) -> str:
    """Why a SecAgg+ round stopped at ``stage``, in one line for the metrics row."""
    if sampled < 2:
        return f"SecAgg+ needs at least 2 sampled devices, the round had {sampled}"
    what = "returned their key shares" if stage == "unmask" else f"remained after the {stage} stage"
    return (
        f"SecAgg+ stopped at its {stage} stage: {remaining} of {sampled} sampled devices "
        f"{what}, and every device's secret needs {threshold} of its {num_shares} "
        "share holders (secagg.reconstruction_threshold); the global adapter is unchanged"
    )


class RoundWorkflow:
    """A round's fit: settle the ledger's debts, run ``fit`` through a :class:`RoundGrid`,
    and tell the strategy who was late or lost, all before the round's metrics row."""

    def __init__(
        self,
        fit: Workflow,
        strategy: RoundOutcomes,
        *,
        timeout_s: float,
        deadline_s: float | None,
        before_round: Callable[[Grid], object] | None = None,
        on_training_request: Callable[[int, set[int]], None] | None = None,
    ) -> None:
        self.fit = fit
        self.strategy = strategy
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.before_round = before_round
        self.on_training_request = on_training_request

    def __call__(self, grid: Grid, context: Context) -> None:
        rnd = current_round(context)
        if self.before_round is not None:
            self.before_round(grid)
        notify = self.on_training_request

        def on_request(nodes: set[int]) -> None:
            if notify is not None:
                notify(rnd, nodes)

        round_grid = RoundGrid(
            grid,
            timeout_s=self.timeout_s,
            deadline_s=self.deadline_s,
            on_training_request=on_request,
        )
        self.fit(round_grid, context)
        if round_grid.late:
            log.warning(
                "round %d: %d device(s) did not send their update in time",
                rnd,
                len(round_grid.late),
            )
        self.strategy.note_transport(len(round_grid.late), dict(round_grid.dropouts))
        self.strategy.note_traffic(round_grid.bytes_down, round_grid.bytes_up)
