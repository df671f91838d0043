"""fedlora.runtime.warm_up: a process that serves many messages builds the model in the
background from its first message on; discovery never waits for that build."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from fedlora import model as model_module
from fedlora import runtime
from fedlora.config import FedloraConfig
from fedlora.errors import ModelError


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Any:
    runtime.clear()
    monkeypatch.setattr(runtime, "_long_lived", False)
    yield
    runtime.clear()


def slow_loads(monkeypatch: pytest.MonkeyPatch, seconds: float, fail: int = 0) -> list[float]:
    """Every base-model load takes ``seconds`` longer; the first ``fail`` raise."""
    real = model_module.load_base_model
    started: list[float] = []

    def load(path: Any) -> Any:
        started.append(time.monotonic())
        time.sleep(seconds)
        if len(started) <= fail:
            raise ModelError(f"cannot read {path}")
        return real(path)

    monkeypatch.setattr(model_module, "load_base_model", load)
    return started


def test_a_process_per_message_never_builds_in_the_background(fresh, monkeypatch):
    loads = slow_loads(monkeypatch, 0.0)

    assert not runtime.warm_up(FedloraConfig())
    time.sleep(0.2)
    assert loads == [] and not runtime._models


def test_a_warm_process_builds_once_in_the_background_and_discovery_does_not_wait(
    fresh, monkeypatch
):
    cfg = FedloraConfig()
    loads = slow_loads(monkeypatch, 1.5)
    runtime.stay_warm()

    assert runtime.warm_up(cfg)
    assert not runtime.warm_up(cfg)  # one build per process and model
    time.sleep(0.1)
    # Discovery's lookup while the model is being built: no wait for the model's lock.
    started = time.monotonic()
    device, records = runtime.device_info(cfg, 3)
    assert time.monotonic() - started < 0.5 and device == "device-0003" and records > 0
    assert any(t.name == "fedlora-warm-up" for t in threading.enumerate())

    bundle = runtime.model_bundle(cfg)  # waits for the build under way, starts no other

    assert len(loads) == 1 and runtime.model_bundle(cfg) is bundle
    assert not runtime.warm_up(cfg)  # built: nothing to start


def test_a_failed_background_build_is_said_by_the_message_that_needs_the_model(fresh, monkeypatch):
    cfg = FedloraConfig()
    loads = slow_loads(monkeypatch, 0.0, fail=2)
    runtime.stay_warm()

    assert runtime.warm_up(cfg)
    deadline = time.monotonic() + 30
    while any(t.name == "fedlora-warm-up" for t in threading.enumerate()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(ModelError, match="cannot read"):  # the fit's own build, its own error
        runtime.model_bundle(cfg)
    assert len(loads) == 2 and not runtime._models
    assert runtime.warm_up(cfg)  # a failed build is not remembered as under way
