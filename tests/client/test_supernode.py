"""fedlora.client.supernode: Flower's SuperNode loop, polling promptly while a round is on."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

import pytest

from fedlora.client.supernode import (
    FLOWER_IDLE_S,
    FLOWER_REPLY_POLL_S,
    PromptClock,
    clean_pull,
    install,
)


def test_an_idle_device_pulls_as_flower_does_and_one_mid_round_within_a_fraction_of_a_second():
    slept: list[float] = []
    clock = PromptClock(sleep=slept.append)

    clock.sleep(FLOWER_IDLE_S)  # no round yet: Flower's 3 s
    clock.sleep(FLOWER_REPLY_POLL_S)  # a message is served: its reply is looked for
    clock.sleep(FLOWER_REPLY_POLL_S)
    for _ in range(12):  # then the pulls that find nothing back off to Flower's 3 s
        clock.sleep(FLOWER_IDLE_S)
    clock.sleep(7)  # any other wait is untouched

    assert slept[:3] == [3.0, 0.05, 0.05]
    idle = slept[3:-1]
    assert idle[0] == pytest.approx(0.1) and idle[1] == pytest.approx(0.15)
    assert all(b >= a for a, b in itertools.pairwise(idle))
    assert idle[-1] == 3.0 and sum(idle[:5]) < 1.5  # the next stage is seen within 1.5 s
    assert slept[-1] == 7


def test_everything_else_is_the_time_module():
    clock = PromptClock()

    assert abs(clock.time() - time.time()) < 1.0 and clock.monotonic is time.monotonic


def test_install_patches_flowers_supernode_loop_once():
    from flwr.supernode import start_client_internal

    real = start_client_internal.time
    try:
        first = install()
        assert start_client_internal.time is first and install() is first
    finally:
        start_client_internal.time = real


def test_the_module_runs_flowers_supernode_with_its_arguments():
    """``fedlora device`` runs it in place of ``flower-supernode``: same CLI."""
    out = subprocess.run(
        [sys.executable, "-m", "fedlora.client.supernode", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert out.returncode == 0, out.stderr
    assert "--superlink" in out.stdout and "--isolation" in out.stdout
    assert "flower-supernode" in out.stdout


# --- a run stopped while its message is received (Flower 1.39's stale-reply bug) ---


def _receive_into_state(pull_and_store, *, confirm):  # type: ignore[no-untyped-def]
    """Flower's receive path on a real NodeState, for a train message of a known run."""
    import numpy as np
    from flwr.app import ArrayRecord, Message, Metadata, RecordDict
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
    )
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supernode.nodestate import NodeStateFactory

    stores = ObjectStoreFactory()
    state = NodeStateFactory(stores).state()
    store = stores.store()
    state.set_node_id(7)
    state.store_run(Run.create_empty(run_id=11))
    meta = Metadata(
        run_id=11,
        message_id="",
        src_node_id=1,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="3",
        created_at=time.time(),
        ttl=600.0,
        message_type="train",
    )
    msg = Message(RecordDict({"arrays": ArrayRecord([np.arange(4.0)])}), metadata=meta)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    objects = {k: v.deflate() for k, v in get_all_nested_objects(msg).items()}
    tree = get_object_tree(msg)

    result = pull_and_store(
        state=state,
        object_store=store,
        node_config={},
        receive=lambda: (msg, tree),
        get_run=lambda run_id: pytest.fail("the run is known"),
        get_fab=lambda fab_hash, run_id: pytest.fail("the run is known"),
        pull_object=lambda run_id, obj_id: objects[obj_id],
        confirm_message_received=confirm,
        trusted_entities=None,
    )
    tasks = state.get_tasks(run_ids=[11])
    return result, state.get_messages(), tasks


def _run_stopped(run_id: int, message_id: str) -> None:
    from flwr.supercore.run import RunNotRunningException

    raise RunNotRunningException


def test_flowers_supernode_keeps_a_message_whose_run_stopped_while_it_was_received():
    """The bug :func:`clean_pull` mends; when Flower fixes it, this fails: drop the mend."""
    from flwr.supernode import start_client_internal

    real = getattr(
        start_client_internal._pull_and_store_message,
        "__wrapped__",
        start_client_internal._pull_and_store_message,
    )
    result, kept, tasks = _receive_into_state(real, confirm=_run_stopped)

    assert result is None  # Flower says the message was ignored ...
    assert len(kept) == 1 and [t.status.status for t in tasks] == ["pending"]  # ... but keeps it


def test_a_message_whose_run_stopped_while_it_was_received_leaves_nothing_to_run():
    from flwr.supernode import start_client_internal

    real = getattr(
        start_client_internal._pull_and_store_message,
        "__wrapped__",
        start_client_internal._pull_and_store_message,
    )
    result, kept, tasks = _receive_into_state(clean_pull(real), confirm=_run_stopped)

    assert result is None and list(kept) == []
    assert [(t.status.status, t.status.sub_status) for t in tasks] == [("finished", "failed")]
    assert "no longer running" in tasks[0].status.details


def test_a_message_received_whole_is_stored_and_its_task_waits():
    from flwr.supernode import start_client_internal

    real = getattr(
        start_client_internal._pull_and_store_message,
        "__wrapped__",
        start_client_internal._pull_and_store_message,
    )
    result, kept, tasks = _receive_into_state(clean_pull(real), confirm=lambda run_id, mid: None)

    assert result == 11 and len(kept) == 1
    assert [t.status.status for t in tasks] == ["pending"]
