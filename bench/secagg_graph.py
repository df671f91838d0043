"""What does SecAgg+'s share graph cost? The full graph against the sparse one, per round.

One SecAgg+ round of n devices, all in this process: the coordinator's
``ReportingSecAggPlus`` talks through a ``RoundGrid`` to n nodes running Flower's own
``secaggplus_mod`` (real key agreement, Shamir shares, masks over the default adapter's
39,040 values) around a stub training step that returns a fixed update, so what is timed
is the protocol alone, every device's share of it and the coordinator's. Variants:

* ``full``: ``num_shares`` 1.0, ``reconstruction_threshold`` 0.6, what every config
  before version 5 used (k = n);
* ``sparse``: both null with ``secagg.dropout_rate`` (default 0.1): k and t from
  ``fedlora.server.secagg_graph.share_graph``.

Per variant and n: the graph (k, t), CPU seconds of the round (this process does all of
it, so CPU is the protocol's total compute, whatever else runs on the machine), wall
seconds per stage, and the serialized bytes sent and received (``RoundGrid``). No
dropouts. The headline ``figure`` is full ÷ sparse CPU at the largest n.

    .venv/bin/python bench/secagg_graph.py [--quick] [--sizes 20 50 100] [--dropout-rate 0.1]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import flwr.compat.common.recorddict_compat as compat  # noqa: E402
import numpy as np  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.client.mod import secaggplus_mod  # noqa: E402
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters  # noqa: E402
from flwr.server import LegacyContext, ServerConfig  # noqa: E402
from flwr.server.compat.grid_client_proxy import GridClientProxy  # noqa: E402
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD  # noqa: E402
from flwr.server.workflow.constant import Key as WorkflowKey  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from bench import benchkit  # noqa: E402
from fedlora.server.rounds import ReportingSecAggPlus, RoundGrid, stage_of  # noqa: E402

#: The default adapter's tensors (LoRA r = 8 on the embedded model): 39,040 values.
SHAPES_VALUES = 39_040


class LocalGrid(Grid):
    """Delivers each message to its node's ``answer`` in this process, timing each stage."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.stage_s: dict[str, float] = defaultdict(float)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        msgs = list(messages)
        started = time.perf_counter()
        replies = []
        for msg in msgs:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            replies.append(self.answer(copy.deepcopy(msg)))  # each node its own copy
        if msgs:
            self.stage_s[stage_of(msgs[0])] += time.perf_counter() - started
        return replies

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError


class Sampler:
    """The strategy's two jobs here: sample every node, and take the aggregate."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self.grid, self.nodes, self.aggregated = grid, nodes, 0

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        return [(GridClientProxy(n, self.grid, 7), FitIns(parameters, {})) for n in self.nodes]

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> Any:
        self.aggregated = len(results)
        return None, {}


def one_round(n: int, shares: tuple[float | None, float | None], dropout_rate: float) -> dict:
    nodes = list(range(1, n + 1))
    update = [np.random.default_rng(0).uniform(-0.05, 0.05, SHAPES_VALUES).astype(np.float32)]
    contexts = {
        i: Context(run_id=7, node_id=i, node_config={}, state=RecordDict(), run_config={})
        for i in nodes
    }

    def train(msg: Message, ctxt: Context) -> Message:
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), 50, {})
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    local = LocalGrid(lambda msg: secaggplus_mod(msg, contexts[msg.metadata.dst_node_id], train))
    strategy = Sampler(local, nodes)
    halts: list[Any] = []
    workflow = ReportingSecAggPlus(
        *shares,
        dropout_rate=dropout_rate,
        max_weight=100.0,
        clipping_range=64.0,
        quantization_range=2**22,
        timeout=600.0,
        on_halt=lambda *args: halts.append(args),
    )
    context = LegacyContext(
        Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,  # type: ignore[arg-type]
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros(SHAPES_VALUES, np.float32)]), True
    )
    grid = RoundGrid(local, timeout_s=600.0)
    cpu, wall = time.process_time(), time.perf_counter()
    workflow(grid, context)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if halts or strategy.aggregated != n:
        raise RuntimeError(f"the round of {n} did not aggregate everyone: {halts}")
    return {
        "graph": list(workflow.graph or ()),
        "cpu_s": benchkit.rnd(cpu, 2),
        "wall_s": benchkit.rnd(wall, 2),
        "stage_wall_s": {k: benchkit.rnd(v, 2) for k, v in local.stage_s.items()},
        "bytes_down": grid.bytes_down,
        "bytes_up": grid.bytes_up,
        "bytes_per_device": (grid.bytes_down + grid.bytes_up) // n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes 20 and 50")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--dropout-rate", type=float, default=0.1)
    args = parser.parse_args()
    benchkit.setup_env()
    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        setattr(TaskIdentity, name, value)  # what a ServerApp process has
    sizes = [20, 50] if args.quick else args.sizes
    results: dict[str, dict[str, Any]] = {}
    for n in sizes:
        for variant, shares in (("full", (1.0, 0.6)), ("sparse", (None, None))):
            got = one_round(n, shares, args.dropout_rate)
            results.setdefault(f"n{n}", {})[variant] = got
            benchkit.log(f"n={n} {variant}: graph {got['graph']} cpu {got['cpu_s']} s")
        row = results[f"n{n}"]
        row["cpu_ratio"] = benchkit.rnd(row["full"]["cpu_s"] / row["sparse"]["cpu_s"], 2)
        row["bytes_ratio"] = benchkit.rnd(
            row["full"]["bytes_per_device"] / row["sparse"]["bytes_per_device"], 2
        )
    benchkit.emit(
        {
            "bench": "secagg_graph",
            "figure": results[f"n{sizes[-1]}"]["cpu_ratio"],
            "dropout_rate": args.dropout_rate,
            "sizes": results,
            "machine": benchkit.machine(),
        }
    )


if __name__ == "__main__":
    main()
