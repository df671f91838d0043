"""bench/secagg_unmask.py runs, checks both rebuilds against the secrets, and prints one JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "secagg_unmask.py"


def test_the_unmask_bench_prints_one_json_with_fedlora_faster_than_flower():
    out = subprocess.run(
        [sys.executable, str(BENCH), "--sizes", "20", "--flower-sample", "3"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    result = json.loads(out)

    assert result["bench"] == "secagg_unmask"
    assert [(r["devices"], r["graph"]) for r in result["rows"]] == [(20, "sparse"), (20, "full")]
    row = result["rows"][0]
    assert (row["shares_k"], row["threshold_t"]) == (20, 11)
    assert 0 < result["figure"] == row["ratio"] < 0.5
