"""fedlora.client.supernode: Flower's SuperNode loop, polling promptly while a round is on."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

import pytest

from fedlora.client.supernode import FLOWER_IDLE_S, FLOWER_REPLY_POLL_S, PromptClock, install


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
