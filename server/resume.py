"""Resuming a run after the coordinator died: the round state, and the loop that continues it.

After every round (round 0 is the initial evaluation) the coordinator writes, in this
order: the round's metrics row, its privacy ledger, and then ``RUN_DIR/state.json``,
the *commit point* of the round. The state names everything a resumed run needs and
checksums each part:

* the global adapter after the round (``checkpoints/round-NNNN.safetensors``, or the
  last one before it when the round aggregated nothing) and its sha256;
* how many events the coordinator's ledger held and the sha256 of those events, so a
  resumed run proves it lost none (the ledger may hold *more*: spend recorded in the
  round that was cut, which is real and stays);
* the device sampler's bit-generator state, so the resumed run samples the devices an
  uninterrupted run would have sampled;
* the devices that declined for their budget, the wall clock so far, the sha256 of
  the run's config (a resumed run must use the same one), and the *segments*: the
  Flower run ids that have worked on this run, oldest first.

A round is committed by an atomic rename, so a crash at any point leaves the state of
the previous round or of this one, never half of one, and a state whose checksum,
checkpoint or ledger prefix does not verify is refused with what to do.

Privacy events are keyed by (device, Flower run id, round), and every resumed segment
gets a new Flower run id: the round cut by the crash is trained again under the new
id, and what devices spent in it under the old id is *also* spent, so the coordinator
asks every device for its events of the earlier segments before the first resumed
round (:meth:`fedlora.server.reconcile.LedgerReconciler.recover`). Nothing is lost and
nothing is counted twice.
"""

from __future__ import annotations

import hashlib
import json
import timeit
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ConfigRecord, Context
from flwr.compat.server.typing import Workflow
from flwr.server import LegacyContext
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import default_centralized_evaluation_workflow
from flwr.serverapp import Grid

from fedlora.errors import ConfigError, PrivacyError
from fedlora.privacy import PrivacyLedger
from fedlora.privacy.ledger import events_digest
from fedlora.runfiles import write_json_atomic

STATE_FORMAT = "fedlora.run-state"
STATE_VERSION = 1
STATE_FILE = "state.json"
#: Run statuses that ``--resume`` continues (``running`` only once its process is gone).
RESUMABLE = ("interrupted", "failed", "running")


def config_digest(cfg_dict: dict[str, Any]) -> str:
    """sha256 of a config's canonical JSON (``FedloraConfig.to_dict()``)."""
    canonical = json.dumps(cfg_dict, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class RunState:
    """What ``state.json`` holds: the last committed round of a run."""

    round: int
    rounds: int
    checkpoint: str
    checkpoint_sha256: str
    ledger_events: int
    ledger_sha256: str
    rng: dict[str, Any]
    config_sha256: str
    segments: list[str] = field(default_factory=list)
    declined: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def next_round(self) -> int:
        return self.round + 1

    def save(self, run_dir: Path) -> None:
        body = asdict(self)
        write_json_atomic(
            {"format": STATE_FORMAT, "version": STATE_VERSION, "state": body, "sha256": _sha(body)},
            run_dir / STATE_FILE,
        )


def _sha(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_state(run_dir: Path, cfg_dict: dict[str, Any]) -> RunState:
    """The run's last committed round, verified against its files; ConfigError otherwise.

    ``cfg_dict`` is the run's ``config.json`` without the metadata fedlora writes beside
    the settings; it must be what the run started with (a fedlora upgrade in between
    does not matter: the digest is of the file's settings, not of today's defaults).
    """
    path = run_dir / STATE_FILE
    where = f"{path}"
    if not path.exists():
        raise ConfigError(
            f"{run_dir} has no {STATE_FILE}: the run never completed its initial evaluation "
            "(or was written by a fedlora without resume); start it again instead"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where} cannot be read ({exc}); the run cannot be resumed") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != STATE_FORMAT
        or data.get("version") != STATE_VERSION
        or not isinstance(data.get("state"), dict)
    ):
        raise ConfigError(f"{where} is not a fedlora {STATE_FORMAT} v{STATE_VERSION} file")
    body = data["state"]
    try:
        ok = data.get("sha256") == _sha(body)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{where}: checksum mismatch (edited or corrupted); cannot resume")
    try:
        state = RunState(**body)
    except TypeError as exc:
        raise ConfigError(f"{where}: malformed state ({exc})") from None
    if state.config_sha256 != config_digest(cfg_dict):
        raise ConfigError(
            f"{run_dir}/config.json is not the config the run started with (its sha256 "
            "differs from the one recorded each round); restore it to resume"
        )
    ckpt = run_dir / state.checkpoint
    if not ckpt.is_file() or file_digest(ckpt) != state.checkpoint_sha256:
        raise ConfigError(
            f"checkpoint {ckpt} of round {state.round} is missing or does not match its "
            "recorded sha256; the run cannot be resumed from it"
        )
    return state


def load_ledger_prefix(path: Path, state: RunState) -> PrivacyLedger:
    """The coordinator's ledger, if it still holds every event the state committed."""
    if not path.exists() and state.ledger_events == 0:
        return PrivacyLedger()
    try:
        ledger = PrivacyLedger.load(path)
    except PrivacyError as exc:
        raise ConfigError(f"cannot resume: {exc}") from None
    held = [e.to_dict() for e in ledger.events[: state.ledger_events]]
    if len(held) < state.ledger_events or events_digest(held) != state.ledger_sha256:
        raise ConfigError(
            f"ledger {path} lacks events committed by round {state.round} ({len(ledger)} "
            f"held, {state.ledger_events} committed): restore it from backup; resuming "
            "would under-count the devices' spend"
        )
    return ledger


class ResumableWorkflow(DefaultWorkflow):
    """Flower's ``DefaultWorkflow`` that can start at a later round.

    From round 1 it is the default workflow unchanged. From round ``first_round`` > 1
    it takes the global parameters from the strategy (the committed checkpoint),
    skips the initial evaluation (its row is already in the run's metrics), and runs
    the rounds ``first_round`` … ``num_rounds`` with Flower's fit, centralized
    evaluation and evaluate steps; ``first_round`` > ``num_rounds`` runs none.
    """

    def __init__(self, fit_workflow: Workflow, first_round: int = 1) -> None:
        super().__init__(fit_workflow=fit_workflow)
        self.first_round = first_round

    def __call__(self, grid: Grid, context: Context) -> None:
        if self.first_round <= 1:
            super().__call__(grid, context)
            return
        if not isinstance(context, LegacyContext):
            raise TypeError(f"expected a LegacyContext, got {type(context).__name__}")
        thread, f_stop, c_done = start_update_client_manager_thread(grid, context.client_manager)
        try:
            c_done.wait()
            params = context.strategy.initialize_parameters(client_manager=context.client_manager)
            if params is None:
                raise RuntimeError("the strategy has no global parameters to resume from")
            context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                params, keep_input=True
            )
            cfg = ConfigRecord()
            cfg[Key.START_TIME] = timeit.default_timer()
            context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
            for current_round in range(self.first_round, context.config.num_rounds + 1):
                cfg[Key.CURRENT_ROUND] = current_round
                self.fit_workflow(grid, context)
                default_centralized_evaluation_workflow(grid, context)
                self.evaluate_workflow(grid, context)
        finally:
            f_stop.set()
            thread.join()
