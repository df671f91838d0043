"""Simulation workers import the device runtime as they start (``fedlora.client.preload``)."""

from __future__ import annotations

import os
import subprocess
import sys

from fedlora import simulate
from fedlora.client import preload


def test_runtime_env_hook_adds_the_preload_and_keeps_flowers_environment():
    flower = {"env_vars": {"PYTHONPATH": "/a:/b"}}
    env = simulate.with_preload(flower)
    hook = "fedlora.client.preload.start"
    assert env == {"env_vars": {"PYTHONPATH": "/a:/b"}, "worker_process_setup_hook": hook}
    assert flower == {"env_vars": {"PYTHONPATH": "/a:/b"}}  # Flower's dict is not edited
    assert simulate.with_preload(None) == {"worker_process_setup_hook": simulate.PRELOAD_HOOK}
    # A setup hook someone else put there is theirs.
    theirs = simulate.with_preload({"worker_process_setup_hook": "x.y"})
    assert theirs["worker_process_setup_hook"] == "x.y"


def test_hook_names_resolve_to_the_functions_ray_will_call():
    from ray._common.utils import load_class

    assert load_class(simulate.RUNTIME_ENV_HOOK) is simulate.with_preload
    assert load_class(simulate.PRELOAD_HOOK) is preload.start


def test_worker_environment_names_the_hook_for_the_run_only(monkeypatch):
    monkeypatch.delenv("RAY_RUNTIME_ENV_HOOK", raising=False)
    with simulate.worker_environment():
        assert os.environ["RAY_RUNTIME_ENV_HOOK"] == simulate.RUNTIME_ENV_HOOK
    assert "RAY_RUNTIME_ENV_HOOK" not in os.environ

    monkeypatch.setenv("RAY_RUNTIME_ENV_HOOK", "their.hook")  # the user's own is kept
    with simulate.worker_environment():
        assert os.environ["RAY_RUNTIME_ENV_HOOK"] == "their.hook"
    assert os.environ["RAY_RUNTIME_ENV_HOOK"] == "their.hook"


PROBE = """
import sys, time
from fedlora.client import preload
assert not [m for m in preload.MODULES if m in sys.modules]  # importing fedlora loads none
preload.wait()  # nothing started: returns at once
assert preload._thread is None
preload.start(); first = preload._thread; preload.start()
assert preload._thread is first  # once per process
preload.wait()
assert not first.is_alive()
missing = [m for m in preload.MODULES if m not in sys.modules]
assert not missing, missing
print("ok")
"""


def test_start_imports_the_modules_once_and_wait_joins():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_a_module_that_fails_to_import_is_left_for_the_message_that_needs_it(monkeypatch):
    monkeypatch.setattr(preload, "MODULES", ("fedlora_no_such_module", "json"))
    preload._import_all()  # does not raise
    assert "json" in sys.modules
