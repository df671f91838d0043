"""Re-exporting a finished run directory: what ``fedlora export RUN_DIR`` runs.

:func:`export_run_dir` rebuilds what the coordinator exported with — the run's
base model (or ``--model``), its adapter, and the coordinator's held-out text
encoded the same way — and hands them to :func:`fedlora.export.export_run`, so
a re-export measures the same tokens the simulation's own export did.
The command line is :mod:`fedlora.cli.export`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch

RUN_CONFIG = "config.json"
_RUN_ONLY_KEYS = ("resolved", "versions")


def run_config(run_dir: Path) -> Any:
    """The run's resolved config (``RUN_DIR/config.json`` without its run-only keys)."""
    from fedlora.config import FedloraConfig

    file = run_dir / RUN_CONFIG
    if not file.is_file():
        raise ConfigError(f"{run_dir} is not a fedlora run directory (no {RUN_CONFIG})")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{file} is not readable JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} is not a fedlora config")
    for key in _RUN_ONLY_KEYS:
        data.pop(key, None)
    return FedloraConfig.from_dict(data)


def _recorded_base_fingerprint(run_dir: Path) -> str | None:
    """The fingerprint of the base the run's previous export was made from, if any."""
    from fedlora.errors import ExportError
    from fedlora.export.manifest import read_manifest

    try:
        return str(read_manifest(run_dir / "export")["base_model"]["fingerprint"]["sha256"])
    except (ExportError, KeyError, TypeError):
        return None


def check_base_matches(run_dir: Path, base: Path) -> None:
    """Refuse a base that is not the checkpoint the run's last export recorded.

    Same-shaped but different weights would merge without complaint (the shape
    check in :func:`fedlora.export.merge.load_peft_model` cannot see them).
    """
    from fedlora.model import model_fingerprint

    recorded = _recorded_base_fingerprint(run_dir)
    if recorded is not None and model_fingerprint(base) != recorded:
        raise ModelError(
            f"base model {base} is not the one the adapter in {run_dir} was exported with "
            f"(fingerprint {recorded[:12]}…): pass the base the run was trained on"
        )


def run_inputs(
    run_dir: str | Path, model: str | Path | None = None
) -> tuple[Any, Path, Path, torch.Tensor, torch.Tensor]:
    """``(config, base, adapter, heldout_ids, heldout_mask)`` of a finished run, checked.

    The held-out text is the coordinator's eval set, encoded as the coordinator did.
    """
    from fedlora import runtime
    from fedlora.export.merge import check_adapter_dir

    root = Path(run_dir)
    cfg = run_config(root)
    adapter = check_adapter_dir(root / "adapter")
    if model is not None:
        if not (Path(model) / "config.json").is_file():
            raise ModelError(f"--model {model} is not a model directory (no config.json)")
        cfg = cfg.replace(model={"path": str(model)})
    base = runtime.resolve_model_path(cfg)
    check_base_matches(root, base)
    ids, mask = runtime.encoded(cfg, "server-eval", runtime.fleet(cfg).server_eval)
    return cfg, base, adapter, ids, mask


def export_run_dir(
    run_dir: str | Path,
    formats: Sequence[str] | None = None,
    model: str | Path | None = None,
    *,
    replace: bool = False,
    gates: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """Add ``formats`` of ``RUN_DIR/adapter`` to ``RUN_DIR/export``; ``formats=None`` is the
    run's config. Artefacts already there stay; one of ``formats`` already there is refused
    unless ``replace``. Each artefact's gate is its format's, with the run's ``export.gates``
    and then ``gates`` (``--gate``) replacing keys."""
    from fedlora.export.pipeline import export_run, gates_for

    cfg, base, adapter, ids, mask = run_inputs(run_dir, model)
    names = tuple(cfg.export.formats) if formats is None else tuple(formats)
    return export_run(
        base,
        adapter,
        Path(run_dir) / "export",
        ids,
        mask,
        formats=names,
        gate=gates_for(names, cfg.export.gates, gates),
        replace=replace,
    )
