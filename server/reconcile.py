"""Reconcile the coordinator's privacy ledger with the devices' own ledgers.

A device records its DP-SGD event in its own ledger *before* its update leaves it,
and the coordinator learns the event from the plaintext metrics of the training
reply. When that reply never arrives the two ledgers part: the device dropped out
after it trained, its reply came after the round's deadline, or a SecAgg+ round
failed (the replies the coordinator did get are recorded by
:meth:`fedlora.server.strategy.LoraFedAvg.round_failed`). The coordinator's ledger must still
hold what every device spent, whether or not its update was used.

Chosen design: **reconcile from the devices' ledgers**. The coordinator knows which
training requests it sent (:attr:`fedlora.server.budget.FleetBudget.owed`); for every one
whose spend it did not learn, it asks that node with a legacy properties request
(:data:`fedlora.privacy.spend.QUERY_KEY`), which SecAgg+ leaves alone, and the device answers
with its events of this run. The device's ledger is the authority, so an answer
settles every owed round of that node: an event it reports is recorded (after the
checks an event in a training reply gets), and a round it reports nothing for was
not trained (it declined, or dropped out before training).

Rejected alternative: a separate plaintext message carrying the spend, before or
after masking. Flower's ``SecAggPlusWorkflow`` has four fixed stages and a device
trains inside the third one, whose reply is the masked update itself: there is no
point between "trained" and "sent" where another message can go, so a device that
dies there (the case that matters) would lose that message too. Announcing the spend
before training would need a fifth stage, a forked workflow, and still a rule for
devices that announce and then never train. Reconciliation needs neither and also
covers the plain workflow and a device whose update diverged and was never sent.

When: at the start of each round, before its first message, so a device is never
asked while the coordinator is waiting on it for the round (in simulation one node's
messages may run concurrently and would race for its SecAgg+ state), and once more
after the last round. A node that does not answer is asked again only at the end of
the run, so a device that is gone for good costs one timeout, not one per round. What
is still owed then is logged and left in the metrics (``unreconciled``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Message
from flwr.common import GetPropertiesIns, Scalar
from flwr.common.constant import MessageTypeLegacy
from flwr.serverapp import Grid

from fedlora.config import FedloraConfig
from fedlora.errors import FedloraError, PrivacyError
from fedlora.privacy import POISSON_SUBSAMPLED_GAUSSIAN, DPSGDEvent
from fedlora.privacy.spend import EVENTS_KEY, QUERY_KEY, RUNS_KEY, decode_events
from fedlora.server.aggregate import UpdateRejected, validate_event
from fedlora.server.budget import FleetBudget

log = logging.getLogger("server")

#: The ``group_id`` of ledger queries (Flower's legacy workflows use the round number).
QUERY_GROUP = "ledger"


def query_messages(node_ids: Iterable[int], runs: Sequence[str] = ()) -> list[Message]:
    """One properties request per node asking for its DP-SGD events of this run (or of
    ``runs``, Flower run ids)."""
    config: dict[str, Scalar] = {QUERY_KEY: True}
    if runs:
        config[RUNS_KEY] = ",".join(runs)
    content = compat.getpropertiesins_to_recorddict(GetPropertiesIns(config))
    return [
        Message(
            content=content,
            dst_node_id=nid,
            message_type=MessageTypeLegacy.GET_PROPERTIES,
            group_id=QUERY_GROUP,
        )
        for nid in node_ids
    ]


class LedgerReconciler:
    """Asks nodes for the spend the coordinator's ledger is owed, and records it."""

    def __init__(self, cfg: FedloraConfig, budget: FleetBudget, run_id: str | None = None):
        self.cfg = cfg
        self.budget = budget
        self.run_id = run_id
        #: Nodes that did not answer a query; asked again only by ``reconcile(final=True)``.
        self.unreachable: set[int] = set()

    def recover(
        self, grid: Grid, node_ids: Sequence[int], runs: Sequence[str], *, up_to_round: int
    ) -> dict[str, int]:
        """A resumed run's first step: what devices spent under the earlier run ids.

        Every node is asked for its events of ``runs`` (the Flower run ids of the
        earlier segments, :mod:`fedlora.server.resume`); an event this ledger lacks is
        recorded after the checks a training reply's event gets, if its round is at
        most ``up_to_round`` (the round the crash cut: no earlier segment asked for a
        later one). Returns how many nodes were asked and answered, and how many
        events were recorded; a node that does not answer is logged (its device's
        own ledger still holds the spend, and its next reply's history will show it).
        """
        counts = {"asked": len(node_ids), "answered": 0, "recorded": 0}
        if not runs or not node_ids or not self.cfg.privacy.record_level:
            return counts
        wanted = set(runs)
        replies = grid.send_and_receive(
            query_messages(node_ids, runs), timeout=self.cfg.secagg.timeout_s
        )
        answered = self._answers(replies)
        counts["answered"] = len(answered)
        for nid, props in sorted(answered.items()):
            known = self.budget.node_device.get(nid)
            if known is None or props.get("device") != known:
                log.warning("node %s: its ledger report names device %r; ignored", nid, known)
                continue
            who = f"node {nid} (device {known})"
            try:
                events = decode_events(
                    props.get(EVENTS_KEY), who, max_events=self.cfg.training.rounds * len(runs)
                )
            except FedloraError as exc:
                log.warning("%s: %s", who, exc)
                continue
            for event in events:
                if event.device != known or event.run not in wanted:
                    log.warning("%s reports an event of run %r; ignored", who, event.run)
                    continue
                if event.round in self.budget.ledger.rounds_for(known, run=event.run):
                    continue  # the coordinator recorded it before the crash
                if event.round > up_to_round:
                    log.warning("%s reports round %d of an earlier run; ignored", who, event.round)
                    continue
                counts["recorded"] += self._record(nid, event, known, who)
        missing = sorted(set(node_ids) - set(answered))
        if missing:
            log.warning(
                "nodes %s did not report their spend before the resume; their devices' own "
                "ledgers may hold rounds this ledger lacks",
                ", ".join(str(n) for n in missing),
            )
        return counts

    def _answers(self, replies: Iterable[Message]) -> dict[int, dict[str, object]]:
        answered: dict[int, dict[str, object]] = {}
        for reply in replies:
            nid = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s did not report its ledger: %s", nid, reply.error.reason)
                continue
            try:
                props = compat.recorddict_to_getpropertiesres(reply.content).properties
            except Exception as exc:  # arbitrary content from the network
                log.warning("node %s sent an unreadable ledger report (%s)", nid, exc)
                continue
            answered[nid] = dict(props)
        return answered

    def reconcile(self, grid: Grid, *, final: bool = False) -> int:
        """Ask every node that owes (all of them when ``final``); returns events recorded.

        Waits at most ``secagg.timeout_s`` for all answers together.
        """
        targets = sorted(n for n in self.budget.owed if final or n not in self.unreachable)
        if not targets:
            return 0
        replies = grid.send_and_receive(query_messages(targets), timeout=self.cfg.secagg.timeout_s)
        answered = self._answers(replies)
        recorded = 0
        for nid in targets:
            if nid in answered:
                self.unreachable.discard(nid)
                recorded += self.settle(nid, answered[nid])
            else:
                self.unreachable.add(nid)
        if final and self.budget.owed:
            log.error(
                "the spend of %d training request(s) is unknown to the coordinator's ledger "
                "(nodes %s did not report it): those devices' own ledgers may hold more",
                self.budget.num_owed(),
                ", ".join(str(n) for n in sorted(self.budget.owed)),
            )
        return recorded

    def settle(self, node_id: int, props: dict[str, object]) -> int:
        """Record what a node's answer reports for its owed rounds; settle them all.

        Returns how many events were recorded. An event is recorded only for a round
        the node owes, for the device the node is known as, for this run, and when it
        passes :func:`fedlora.server.aggregate.validate_event`; anything else is logged and left
        out (a device cannot add rounds it was not asked to train). A node whose answer
        cannot be read settles nothing and is asked again.
        """
        owed = set(self.budget.owed.get(node_id, ()))
        known = self.budget.node_device.get(node_id)
        claimed = props.get("device")
        device = known if known is not None else claimed
        who = f"node {node_id} (device {device})"
        if not isinstance(device, str) or not device or (known and claimed != known):
            log.warning("%s: its ledger report names device %r; ignored", who, claimed)
            return 0
        try:
            # One event per round of this run at most.
            events = decode_events(props.get(EVENTS_KEY), who, max_events=self.cfg.training.rounds)
        except FedloraError as exc:
            log.warning("%s: %s", who, exc)
            return 0
        recorded = 0
        for event in events:
            if event.round not in owed:
                continue  # recorded already, or a round it was never asked to train
            if event.device != device or (self.run_id is not None and event.run != self.run_id):
                log.warning(
                    "%s reports an event of device %s in run %r; ignored",
                    who,
                    event.device,
                    event.run,
                )
                continue
            recorded += self._record(node_id, event, device, who)
        for rnd in owed:  # its ledger is the authority: what it did not report, it did not spend
            self.budget.settle(node_id, rnd)
        return recorded

    def _record(self, node_id: int, event: DPSGDEvent, device: str, who: str) -> bool:
        """Record an event a device reported from its ledger, if it passes the checks."""
        try:
            self._check(event, device, who)
            self.budget.add(node_id, event)
        except (UpdateRejected, PrivacyError) as exc:
            log.warning("%s: its reported round %d is not recorded: %s", who, event.round, exc)
            return False
        log.info("%s: round %d recorded from its own ledger", who, event.round)
        return True

    def _check(self, event: DPSGDEvent, device: str, who: str) -> None:
        """The checks of an event in a training reply (:func:`validate_event`)."""
        cfg = self.cfg
        p = cfg.privacy
        n = self.budget.num_records.get(device)
        if n is None:
            # Never identified at discovery: the record count its sample rate implies.
            n = max(1, round(cfg.training.batch_size / event.sample_rate))
        if event.mechanism != POISSON_SUBSAMPLED_GAUSSIAN:
            raise UpdateRejected("privacy_event", f"{who}: mechanism {event.mechanism!r}")
        validate_event(
            event.to_dict() | {"run": event.run},
            device,
            n,
            who,
            steps=cfg.training.local_steps,
            batch_size=cfg.training.batch_size,
            delta=p.delta,
            noise_multiplier=p.noise_multiplier,
            accountant=p.accountant,
            history=self.budget.ledger.events_for(device, unit="record"),
            budget=self.budget.budget(device),
        )
