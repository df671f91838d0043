"""The live display of a run: a round bar and one line per round (rich)."""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedlora.config import FedloraConfig


class RunProgress:
    """Context manager; ``on_round(row)`` is called from the coordinator's thread."""

    def __init__(self, cfg: FedloraConfig, info: dict[str, Any], enabled: bool = True) -> None:
        self.cfg = cfg
        self.info = info
        self.enabled = enabled
        self.console = Console(stderr=True)
        self._lock = threading.Lock()
        self._progress = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            disable=not enabled,
            transient=False,
        )
        self._task = self._progress.add_task(
            "rounds", total=cfg.training.rounds, status="evaluating the initial adapter"
        )

    def __enter__(self) -> RunProgress:
        if self.enabled:
            c, i = self.cfg, self.info
            parts = []
            if c.privacy.record_level:
                parts.append(
                    f"DP-SGD ε≤{c.privacy.epsilon:g}, δ={c.privacy.delta:g} "
                    f"({c.privacy.accountant}) per record"
                )
            if c.privacy.device_level:
                d = c.privacy.device
                parts.append(
                    f"distributed DP ε≤{d.epsilon:g}, δ={d.delta:g} per device "
                    f"({d.bits}-bit SecAgg+)"
                )
            privacy = " + ".join(parts) or "[red]no DP[/red]"
            self.console.print(
                f"[bold]fedlora[/bold] {i['devices']} devices "
                f"({i['train_records']} training records), {c.fleet.devices_per_round} per round, "
                f"{c.training.rounds} rounds · LoRA r={c.lora.r} "
                f"({i['adapter_parameters']:,} parameters) · {privacy} · "
                f"SecAgg+ {'on' if c.secagg.enabled else '[red]off[/red]'}"
            )
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def on_round(self, row: dict[str, Any]) -> None:
        with self._lock:
            r = row["round"]
            line = f"round {r:>3}  eval loss {row['eval_loss']:.4f}"
            if r > 0:
                line += f"  devices {row['num_devices']}/{row['sampled']}"
                if self.cfg.fleet.profiles and "online" in row:
                    line += f" of {row['online']} online"
                if row.get("train_loss") is not None:
                    line += f"  train loss {row['train_loss']:.4f}"
                if self.cfg.privacy.record_level:
                    line += f"  max ε {row['max_epsilon']:.3f}"
                if self.cfg.privacy.device_level:
                    line += f"  max device ε {row['max_device_epsilon']:.3f}"
                line += f"  {row['round_s']:.1f}s"
                if row.get("train_s_max"):
                    line += f" (slowest training {row['train_s_max']:.1f}s)"
                if row.get("failures") or row.get("rejected"):
                    line += f"  [yellow]{row['failures']} failed, {row['rejected']} rejected[/]"
                if row.get("skipped"):
                    line += f"  [yellow]skipped: {row['skipped']}[/]"
            if self.enabled:
                self._progress.console.print(line)
            self._progress.update(
                self._task,
                completed=r,
                status=f"eval loss {row['eval_loss']:.4f}",
            )
