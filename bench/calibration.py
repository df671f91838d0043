"""What does calibrating σ cost a device per round? Today's accountant against the one before.

Replays the calibrations of a default ``make run`` without training: 20 embedded devices
(their own sample rates q = 16 / records), 10 sampled per round by a seeded draw, 5
rounds, ε = 8 at δ = 1e-5, 10 steps per round; each sampled device calibrates σ for its
remaining rounds against its own history (the σ it calibrated before), as
``fedlora.client.device_client.plan_noise`` does.

Each calibration runs twice, alternating which goes first, with every cache emptied
before each (no help from an earlier calibration, as in a fresh worker):

* ``before``: the accountant as it was until 2026-12-02 (commit 88fe0fb): ``survival``
  evaluating both branches everywhere, the truncated mean's integrand going through a
  one-element array, no per-grid cache of the history's groups, the RDP binomial table
  recomputed per σ, the (ε, δ) read-out over the whole grid (``prv_accountant``'s
  ``compute_epsilon``), and (until 2026-12-03) the RDP series summed with
  ``scipy.special.logsumexp`` rather than ``rdp._logsumexp_rows``, the same values
  without SciPy's array-API dispatch. These are the old functions (below) patched
  in; the search is the same.
* ``after``: the accountant as it is.

The process runs one thread per library, as a simulation worker does
(:func:`fedlora.simulate.worker_environment`): with two, numpy's BLAS spins a second
thread and the CPU seconds double.

Counts per calibration: ``accountant_calls`` (ε evaluations the search asks for, PRV and
RDP), ``prv_grids`` (PRV compositions actually run), ``discretisations`` (single-group
PRV discretisations). Seconds: CPU time of this process (what it costs even when other
work preempts it) and wall. ``sigma_equal``: both give the same σ for every calibration.
``path_dependent``: calibrations where a σ one 4-digit step lower also meets the target:
any other search (warm start, tighter bracket) could then return another σ, which is why
this one keeps the search and makes each evaluation cheaper.

Prints one JSON object; the headline ``figure`` is before ÷ after CPU seconds.

    .venv/bin/python bench/calibration.py [--quick] [--devices 20] [--per-round 10] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Before numpy loads its BLAS: one thread, as in a simulation worker.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402
from scipy import special  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import benchkit  # noqa: E402
from fedlora.privacy import calibrate as cal  # noqa: E402
from fedlora.privacy.accountants import prv, rdp  # noqa: E402
from fedlora.privacy.events import DPSGDEvent  # noqa: E402

TARGET, DELTA, STEPS, BATCH = 8.0, 1e-5, 10, 16


# ------------------------------------------------------------ the accountant before
def survival_before(t: Any, q: float, sigma: float) -> Any:
    """``prv.survival`` until 2026-12-02: both formulas on every point, then picked."""
    t = np.asarray(t, dtype=np.float64)
    live = t > (math.log1p(-q) if q < 1.0 else -math.inf)
    tl = np.where(live, t, 1.0)
    with np.errstate(over="ignore", divide="ignore"):
        z_pos = tl - math.log(q) + np.log1p((q - 1.0) * np.exp(-np.abs(tl)))
        z_neg = np.log1p(np.expm1(np.minimum(tl, 0.0)) / q)
    z = np.where(tl > 0, z_pos, z_neg)
    scale = 2.0 * math.sqrt(2.0) * sigma
    tail = q / 2.0 * special.erfc((2.0 * sigma**2 * z - 1.0) / scale) + (
        1.0 - q
    ) / 2.0 * special.erfc((2.0 * sigma**2 * z + 1.0) / scale)
    return np.where(live, tail, 1.0)


def survival_at_before(t: float, q: float, sigma: float) -> float:
    return float(survival_before(np.array([t]), q, sigma)[0])


def read_epsilon_before(
    pmf: Any, domain: Any, delta: float, delta_error: float, eps_error: float, hint: float = 0.0
) -> tuple[float, float, float]:
    """The read-out before ``prv.read_epsilon`` (2026-12-02): ``prv_accountant``'s, whole grid."""
    from prv_accountant.discrete_privacy_random_variable import DiscretePrivacyRandomVariable

    out = DiscretePrivacyRandomVariable(pmf, domain).compute_epsilon(delta, delta_error, eps_error)
    return (float(out[0]), float(out[1]), float(out[2]))


def logsumexp_rows_before(a: Any) -> Any:
    """RDP's row sums until 2026-12-03: SciPy's ``logsumexp`` (the same values)."""
    return special.logsumexp(a, axis=1)


@contextlib.contextmanager
def accountant_before() -> Iterator[None]:
    saved = (
        prv.survival,
        prv._survival_at,
        prv.GROUP_CACHE_BYTES,
        rdp._log_comb_table,
        prv.read_epsilon,
        rdp._logsumexp_rows,
    )
    prv.survival = survival_before  # type: ignore[assignment]
    prv._survival_at = survival_at_before  # type: ignore[assignment]
    prv.GROUP_CACHE_BYTES = 0  # nothing is kept
    rdp._log_comb_table = rdp._log_comb_table.__wrapped__  # type: ignore[assignment]
    prv.read_epsilon = read_epsilon_before
    rdp._logsumexp_rows = logsumexp_rows_before
    try:
        yield
    finally:
        (
            prv.survival,
            prv._survival_at,
            prv.GROUP_CACHE_BYTES,
            rdp._log_comb_table,
            prv.read_epsilon,
            rdp._logsumexp_rows,
        ) = saved


def empty_caches() -> None:
    cal._calibrate.cache_clear()
    prv.prv_epsilon_bounds.cache_clear()
    prv.clear_group_cache()
    rdp._rdp_cached.cache_clear()
    rdp._log_comb_table.cache_clear()


# ------------------------------------------------------------ measuring
class Counter:
    def __init__(self) -> None:
        self.calls = {"prv": 0, "rdp": 0}
        self.discretisations = 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        eps_for, discretise = cal.epsilon_for, prv._discretise

        def counting_eps(events: Any, delta: float, accountant: str = "prv") -> float:
            self.calls[accountant] += 1
            return eps_for(events, delta, accountant)

        def counting_discretise(*args: Any) -> Any:
            self.discretisations += 1
            return discretise(*args)

        cal.epsilon_for, prv._discretise = counting_eps, counting_discretise  # type: ignore[assignment]
        try:
            yield
        finally:
            cal.epsilon_for, prv._discretise = eps_for, discretise


def measure(call: Callable[[], float], before: bool) -> dict[str, Any]:
    empty_caches()
    counter = Counter()
    misses = prv.prv_epsilon_bounds.cache_info().misses
    with contextlib.ExitStack() as stack:
        if before:
            stack.enter_context(accountant_before())
        stack.enter_context(counter.installed())
        cpu, wall = time.process_time(), time.perf_counter()
        sigma = call()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {
        "sigma": sigma,
        "cpu_s": cpu,
        "wall_s": wall,
        "accountant_calls": counter.calls["prv"] + counter.calls["rdp"],
        "prv_calls": counter.calls["prv"],
        "prv_grids": prv.prv_epsilon_bounds.cache_info().misses - misses,
        "discretisations": counter.discretisations,
    }


def one_step_lower_also_fits(sigma: float, q: float, rounds: int, history: list[Any]) -> bool:
    """Would the 4-digit σ below ``sigma`` also meet the target (so the search path decides)?"""
    step = 10.0 ** (math.floor(math.log10(sigma)) - 3)
    lower = round(sigma - step, 10)
    planned = DPSGDEvent(
        device="x", round=0, noise_multiplier=lower, sample_rate=q, steps=STEPS * rounds,
        delta=DELTA,
    )  # fmt: skip
    return cal.epsilon_after(history, planned, DELTA) <= TARGET


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"calibrations": len(rows)}
    for key in ("accountant_calls", "prv_calls", "prv_grids", "discretisations"):
        out[f"{key}_per_calibration"] = benchkit.rnd(statistics.mean(r[key] for r in rows), 2)
    for key in ("cpu_s", "wall_s"):
        values = [r[key] for r in rows]
        out[f"{key}_per_calibration"] = benchkit.rnd(statistics.mean(values), 4)
        out[f"{key}_median"] = benchkit.rnd(statistics.median(values), 4)
        out[f"{key}_max"] = benchkit.rnd(max(values), 4)
        out[f"{key}_total"] = benchkit.rnd(sum(values), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of --rounds")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    benchkit.setup_env()
    from fedlora import runtime
    from fedlora.config import FedloraConfig

    rounds = 3 if args.quick else args.rounds
    cfg = FedloraConfig().replace(fleet={"num_devices": args.devices})
    q_of = {
        i: min(1.0, BATCH / max(1, runtime.device_info(cfg, i)[1])) for i in range(args.devices)
    }
    draw = random.Random(args.seed)
    history: dict[int, list[DPSGDEvent]] = {i: [] for i in range(args.devices)}
    rows: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    lower_fits = 0
    for r in range(1, rounds + 1):
        for i in sorted(draw.sample(range(args.devices), args.per_round)):
            spent = list(history[i])

            def call(q: float = q_of[i], left: int = rounds - r + 1, h: list[Any] = spent) -> float:
                return cal.calibrate_noise_multiplier(TARGET, DELTA, q, STEPS, left, history=h)

            order = ("before", "after") if len(rows["after"]) % 2 == 0 else ("after", "before")
            got = {name: measure(call, before=name == "before") for name in order}
            for name in order:
                rows[name].append(got[name])
            sigma = got["after"]["sigma"]
            lower_fits += one_step_lower_also_fits(sigma, q_of[i], rounds - r + 1, spent)
            history[i].append(
                DPSGDEvent(device=str(i), round=r, noise_multiplier=sigma, sample_rate=q_of[i],
                           steps=STEPS, delta=DELTA)
            )  # fmt: skip
            benchkit.log(
                f"round {r} device {i}: sigma {sigma} cpu {got['before']['cpu_s']:.3f} -> "
                f"{got['after']['cpu_s']:.3f} s"
            )
    before, after = summary(rows["before"]), summary(rows["after"])
    sigmas = [(b["sigma"], a["sigma"]) for b, a in zip(rows["before"], rows["after"], strict=True)]
    benchkit.emit(
        {
            "bench": "calibration",
            "figure": benchkit.rnd(before["cpu_s_total"] / after["cpu_s_total"], 2),
            "figure_wall": benchkit.rnd(before["wall_s_total"] / after["wall_s_total"], 2),
            "workload": {
                "devices": args.devices,
                "per_round": args.per_round,
                "rounds": rounds,
                "epsilon": TARGET,
                "delta": DELTA,
                "steps_per_round": STEPS,
                "seed": args.seed,
            },
            "before": before,
            "after": after,
            "sigma_equal": all(b == a for b, a in sigmas),
            "sigma_max_rel_diff": max(abs(b - a) / b for b, a in sigmas),
            "path_dependent": lower_fits,
            "machine": benchkit.machine(),
        }
    )


if __name__ == "__main__":
    main()
