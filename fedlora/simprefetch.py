"""Simulation only: the devices' σ calibrations computed ahead of their rounds, on idle CPU.

In calibrated mode (``privacy.noise_multiplier`` null) every sampled device searches for
its σ before it trains (:func:`fedlora.client.device_client.plan_noise`): 0.04–1 s of
accountant work per device-round, on the critical path of the round. Yet in a simulation
every input of that search is known before the run starts: the devices' record counts
and budgets come from the config, the coordinator's sampling is a seeded draw
(:func:`fedlora.server.sampling.forecast`), and a device's history is the σ it
calibrated in its earlier rounds. So a process of its own, at the lowest CPU priority
(``nice`` 19: it runs when a core would otherwise idle, as while the simulation imports
and loads the model), walks the forecast round by round and calibrates each device
exactly as the device will, with the device's own history, and files every answer in
the simulation's shared directory (:mod:`fedlora.privacy.calibration_cache`). A device
that finds its question answered there trains at once with that σ, the float its own
search would have returned; one that does not (the forecast was wrong, or the prefetch
is behind) searches as before and files its answer, which the prefetch then reads
instead of repeating.

Nothing here decides anything: a wrong forecast or a prefetch that dies costs only the
time it would have saved. It is started for a fresh simulation in calibrated mode
(:class:`Prefetch`); not for a resumed one, an audit (its canaries change the records),
nor with ``fedlora simulate --no-prefetch``. On a multi-node Ray cluster the directory
is local to the coordinator's machine and the other nodes' workers simply miss.

    python -m fedlora.simprefetch --config CONFIG.json --cache DIR   (started by the simulation)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.config import FedloraConfig
from fedlora.runtime import WORKER_THREAD_VARS

log = logging.getLogger("fedlora.simulate")


@dataclass(frozen=True)
class Calibration:
    """One device's calibration before one round, as the device will ask it."""

    device: str
    server_round: int
    sample_rate: float
    budget: float


def forecast_calibrations(cfg: FedloraConfig) -> Iterator[Calibration]:
    """The calibrations a fresh run of ``cfg`` asks for, in round order, if the
    coordinator's sampling goes as forecast; nothing outside calibrated record-level DP."""
    from fedlora import fleetsim, runtime
    from fedlora.privacy import device_budget
    from fedlora.privacy.events import poisson_sample_rate
    from fedlora.server.sampling import forecast

    if not Prefetch.wanted(cfg):
        return
    info = {}
    for index in range(runtime.device_count(cfg)):
        device, records = runtime.device_info(cfg, index)
        profile = fleetsim.profile_of(cfg.fleet, cfg.seed, device)
        info[device] = (
            poisson_sample_rate(cfg.training.batch_size, records),
            device_budget(cfg.privacy.epsilon, None if profile is None else profile.budget_epsilon),
        )
    for server_round, chosen in enumerate(forecast(cfg, sorted(info), cfg.training.rounds), 1):
        for device in chosen:
            q, budget = info[device]
            yield Calibration(device, server_round, q, budget)


def prefetch(cfg: FedloraConfig, cache_dir: Path) -> dict[str, int]:
    """Calibrate every forecast (device, round) into ``cache_dir``, each device against
    the history its earlier forecast rounds give it; returns counts."""
    from fedlora.errors import BudgetExhaustedError
    from fedlora.privacy import DPSGDEvent, calibrate_noise_multiplier
    from fedlora.privacy.calibration_cache import SharedCalibrations

    shared = SharedCalibrations(cache_dir)
    p, steps, rounds = cfg.privacy, cfg.training.local_steps, cfg.training.rounds
    history: dict[str, list[DPSGDEvent]] = {}
    counts = {"calibrated": 0, "declined": 0}
    for c in forecast_calibrations(cfg):
        spent = history.setdefault(c.device, [])
        try:
            sigma = calibrate_noise_multiplier(
                c.budget,
                p.delta,
                c.sample_rate,
                steps,
                max(1, rounds - c.server_round + 1),
                history=spent,
                accountant=p.accountant,
                shared=shared,
            )
        except BudgetExhaustedError:  # the device will decline: its history stays as it is
            counts["declined"] += 1
            continue
        spent.append(
            DPSGDEvent(
                device=c.device,
                round=c.server_round,
                noise_multiplier=sigma,
                sample_rate=c.sample_rate,
                steps=steps,
                delta=p.delta,
            )
        )
        counts["calibrated"] += 1
    return counts


class Prefetch:
    """The prefetch process for one simulation, and the directory it shares.

    :meth:`start` makes the directory (0700), writes the config into it, starts
    ``python -m fedlora.simprefetch`` at nice 19 and sets
    :data:`fedlora.privacy.calibration_cache.ENV` for the workers Ray will start;
    :meth:`stop` ends the process, puts the variable back and removes the directory.
    """

    def __init__(self, cfg: FedloraConfig) -> None:
        self.cfg = cfg
        self.root: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._saved_env: str | None = None

    @staticmethod
    def wanted(cfg: FedloraConfig) -> bool:
        """Whether ``cfg``'s devices calibrate σ (record-level DP, no fixed σ)."""
        return cfg.privacy.record_level and cfg.privacy.noise_multiplier is None

    def start(self) -> Prefetch:
        from fedlora.privacy.calibration_cache import ENV

        if not self.wanted(self.cfg):
            return self
        self.root = Path(tempfile.mkdtemp(prefix="fedlora-prefetch-"))
        cache = self.root / "sigma"
        cache.mkdir(mode=0o700)
        config = self.root / "config.json"
        config.write_text(json.dumps(self.cfg.to_dict()), encoding="utf-8")
        with (self.root / "prefetch.log").open("wb") as log:
            self.process = self._spawn(config, cache, log)
        self._saved_env = os.environ.get(ENV)
        os.environ[ENV] = str(cache)
        return self

    @staticmethod
    def _spawn(config: Path, cache: Path, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            (sys.executable, "-m", "fedlora.simprefetch", "--config", config, "--cache", cache),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, **dict.fromkeys(WORKER_THREAD_VARS, "1")},
            preexec_fn=_lowest_priority,
        )

    def stop(self, *, quiet: bool = False) -> None:
        """End the process (a failure of its own is logged unless ``quiet``: the run's
        own error, if it has one, is the one to say), put the variable back, clean up."""
        from fedlora.privacy.calibration_cache import ENV

        if self.process is not None:
            code = self.process.poll()
            if code is None:  # still ahead of rounds that will not come
                self.process.terminate()
            elif code != 0 and self.root is not None and not quiet:  # costs time only: say why
                lines = (self.root / "prefetch.log").read_text(errors="replace").splitlines()
                log.warning(
                    "the calibration prefetch failed (exit %d): %s",
                    code,
                    lines[-1] if lines else "no output",
                )
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        if self.root is not None:
            if self._saved_env is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = self._saved_env
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> Prefetch:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop(quiet=exc_type is not None)


def _lowest_priority() -> None:
    os.nice(19)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedlora.simprefetch",
        description="Calibrate a simulation's device σ ahead of its rounds (started by "
        "`fedlora simulate`; not a user command).",
    )
    parser.add_argument("--config", type=Path, required=True, help="the run's config (JSON)")
    parser.add_argument("--cache", type=Path, required=True, help="the shared directory")
    args = parser.parse_args(argv)
    data: Any = json.loads(args.config.read_text(encoding="utf-8"))
    counts = prefetch(FedloraConfig.from_dict(data), args.cache)
    print(json.dumps(counts), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
