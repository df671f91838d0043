"""Who is out there: ask every connected node for its device id before round 1.

Flower's node ids are random per run, so sampling by node id could never be
reproduced from a seed. The coordinator asks each node once (a legacy
``get_properties`` message, which SecAgg+ leaves alone) for its device id and
budget, then samples by device id: the same seed samples the same devices.
It also means budgets are known before the first round, not after it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Message
from flwr.common import GetPropertiesIns
from flwr.common.constant import MessageTypeLegacy
from flwr.serverapp import Grid

from fedlora.errors import FedloraError

log = logging.getLogger("fedlora.server")


def discover_devices(
    grid: Grid, expected: int, min_nodes: int, timeout_s: float
) -> dict[int, dict[str, Any]]:
    """Node id → the properties its device reported (``device``, ``budget_epsilon``, ...).

    Waits up to ``timeout_s`` for ``expected`` nodes to connect, settling for
    ``min_nodes``; a node that does not answer is left out of the map.
    """
    deadline = time.monotonic() + timeout_s
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        node_ids = list(grid.get_node_ids())
    if len(node_ids) < min_nodes:
        raise FedloraError(
            f"only {len(node_ids)} device(s) connected within {timeout_s:.0f}s, "
            f"need at least {min_nodes}: start more devices or lower fleet.min_devices"
        )
    content = compat.getpropertiesins_to_recorddict(GetPropertiesIns({}))
    messages = [
        Message(
            content=content,
            dst_node_id=nid,
            message_type=MessageTypeLegacy.GET_PROPERTIES,
            group_id="discovery",
        )
        for nid in node_ids
    ]
    found: dict[int, dict[str, Any]] = {}
    for reply in grid.send_and_receive(messages, timeout=max(1.0, deadline - time.monotonic())):
        if reply.has_error():
            log.warning(
                "node %s did not identify itself: %s",
                reply.metadata.src_node_id,
                reply.error.reason,
            )
            continue
        props = compat.recorddict_to_getpropertiesres(reply.content).properties
        if isinstance(props.get("device"), str):
            found[reply.metadata.src_node_id] = dict(props)
    return found
