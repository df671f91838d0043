"""One audit: a simulated run with canaries, the canaries scored, the bound written.

``AUDIT_DIR`` is an ordinary run directory (config, ledger, adapter, privacy report,
...) plus ``audit.json``. The canaries go in through the simulation's data hook only
(:meth:`fedlora.data.canaries.CanaryPlan.apply`); ``run.json`` marks the run as an
audit, which ``fedlora simulate --resume`` refuses (a resumed run would lose them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedlora.config import FedloraConfig
from fedlora.errors import ConfigError
from fedlora.reporting.audit import AUDIT_FILE, AUDIT_FORMAT, AUDIT_VERSION
from fedlora.runfiles import write_json

DEFAULT_CANARIES = 256
UNIT = "one training sequence (record) of one device"
SCORE = (
    "loss reduction: a canary's mean token loss under the initial adapter minus under the "
    "final global adapter"
)
METHOD = (
    "Steinke, Nasr & Jagielski 2023 (one training run), Theorem 5.2 with its δ term; "
    "guess 'in' for the k highest scores and 'out' for the k lowest, k fixed in advance, "
    "confidence split among the k tried (Bonferroni)"
)


def audit_delta(cfg: FedloraConfig) -> float:
    """The δ of the claim the audit checks: the record-level one, or under device-level DP
    alone the device-level one (``privacy.device.delta``), as the claim itself."""
    return cfg.privacy.delta if cfg.privacy.record_level else cfg.privacy.device.delta


def run_audit(
    cfg: FedloraConfig,
    out: Path,
    *,
    canaries: int = DEFAULT_CANARIES,
    confidence: float = 0.95,
    force: bool = False,
    verbose: bool = False,
    show_progress: bool = True,
    client_mods: Sequence[Any] = (),
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` with canaries in ``out``, score them, write and return ``audit.json``.

    ``client_mods``: extra ClientApp mods (the power test's noise-off fault); none in use.
    """
    from fedlora import runtime
    from fedlora.audit.score import canary_losses, final_checkpoint, vocabulary_words
    from fedlora.data.canaries import draw_canaries
    from fedlora.privacy.audit import audit_scores
    from fedlora.server.checkpoint import load_checkpoint
    from fedlora.simulate import check_run_dir, simulate

    note = say or (lambda _line: None)
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"--confidence must be in (0, 1), got {confidence}")
    check_run_dir(out, force)
    num_devices = len(runtime.fleet(cfg).devices)
    words = vocabulary_words(runtime.model_bundle(cfg).tokenizer)
    plan = draw_canaries(canaries, num_devices, cfg.seed, words if len(words) >= 50 else ())
    inserted = int(plan.included.sum())
    holders = len({c.device_index for c in plan.canaries if c.included})
    note(
        f"audit: {canaries} canaries, {inserted} inserted (coin flips, seed {cfg.seed}) into "
        f"{holders} of {num_devices} devices' training records; training…"
    )
    t0 = time.perf_counter()
    summary = simulate(
        cfg,
        out,
        force=force,
        verbose=verbose,
        show_progress=show_progress,
        data_hook=plan,
        client_mods=client_mods,
    )
    train_s = time.perf_counter() - t0
    note(f"audit: trained in {train_s:.0f}s; scoring {canaries} canaries…")
    t1 = time.perf_counter()
    bundle = runtime.model_bundle(cfg)
    final = load_checkpoint(final_checkpoint(out), bundle.names)
    before, after = canary_losses(cfg, plan.texts, final)
    scores = before - after
    result = audit_scores(scores, plan.included, audit_delta(cfg), confidence)
    score_s = time.perf_counter() - t1
    claimed = None
    if "privacy" in summary:
        # A canary is a record: the record-level claim, or under device-level DP alone the
        # device-level one (a record's presence changes one device's data only).
        p = summary["privacy"]
        p = p if "max_epsilon" in p else p["device_level"]
        claimed = {
            "epsilon": p["max_epsilon"],
            "delta": p["delta"],
            "accountant": p["accountant"],
            "budget_epsilon": p["budget_epsilon"],
        }
    audit: dict[str, Any] = {
        "format": AUDIT_FORMAT,
        "version": AUDIT_VERSION,
        **result.to_dict(),
        "claimed": claimed,
        "unit": UNIT,
        "score": SCORE,
        "method": METHOD,
        "seed": cfg.seed,
        "train_s": round(train_s, 2),
        "score_s": round(score_s, 2),
        "canary_scores": [
            {
                "device": c.device_index,
                "included": c.included,
                "loss_initial": float(b),
                "loss_final": float(a),
                "score": float(b - a),
                "text": c.text,
            }
            for c, b, a in zip(plan.canaries, before, after, strict=True)
        ],
    }
    write_json(out / AUDIT_FILE, audit)
    if claimed is not None:
        _rewrite_report(out)
    return audit


def _rewrite_report(run_dir: Path) -> None:
    """The run's privacy report again, now with the audit beside the claim."""
    from fedlora.reporting.artefacts import write_artefacts
    from fedlora.reporting.rundir import load_run, report_for

    write_artefacts(report_for(load_run(run_dir)), run_dir / "privacy")
