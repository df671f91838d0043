"""``RUN_DIR/audit.json`` (written by ``fedlora audit``) as the privacy report shows it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError

AUDIT_FILE = "audit.json"
AUDIT_FORMAT = "fedlora.audit"
AUDIT_VERSION = 1
#: What the report carries of an audit (the per-canary scores stay in audit.json).
SUMMARY_KEYS = (
    "epsilon_lower_bound",
    "confidence",
    "delta",
    "canaries",
    "included",
    "guesses",
    "correct",
    "max_possible",
    "claimed",
    "unit",
    "score",
    "method",
)


def read_audit(run_dir: Path) -> dict[str, Any] | None:
    """``RUN_DIR/audit.json`` if the run was an audit (None otherwise); a damaged or foreign
    file is refused with one line."""
    path = Path(run_dir) / AUDIT_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != AUDIT_FORMAT:
        raise ConfigError(f"{path} is not a fedlora audit (format {AUDIT_FORMAT!r})")
    if data.get("version") != AUDIT_VERSION or any(k not in data for k in SUMMARY_KEYS):
        raise ConfigError(
            f"{path}: unknown audit version {data.get('version')!r} or fields missing"
        )
    return data


def audit_summary(audit: dict[str, Any]) -> dict[str, Any]:
    """The audit's figures for the privacy report (``report["audit"]``)."""
    return {key: audit[key] for key in SUMMARY_KEYS}
