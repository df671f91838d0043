"""Per-device update-norm clipping before masking, and the config rule that ties it to SecAgg+."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedlora import runtime
from fedlora.client.device_client import DeviceClient, clip_update_norm
from fedlora.config import CONFIG_VERSION, FedloraConfig, load_config
from fedlora.errors import ConfigError, UpdateError
from fedlora.protocol import NUM_ROUNDS_KEY, ROUND_KEY
from tests.conftest import tiny_lora_model


def _norm(update: list[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in update))


# ------------------------------------------------------------ clip_update_norm
def test_an_update_above_the_bound_is_scaled_to_it_as_a_whole():
    # ||(3, 4)|| = 5 and ||(12,)|| = 12: the whole update has norm 13.
    update = [np.array([3.0, 4.0], np.float32), np.array([12.0], np.float32)]

    clipped, norm = clip_update_norm(update, 6.5)

    assert norm == 13.0
    np.testing.assert_allclose(clipped[0], [1.5, 2.0], rtol=1e-7)
    np.testing.assert_allclose(clipped[1], [6.0], rtol=1e-7)
    assert all(c.dtype == np.float32 for c in clipped)
    np.testing.assert_array_equal(update[0], [3.0, 4.0])  # the input is not modified


def test_an_update_within_the_bound_is_returned_as_it_is():
    update = [np.array([3.0, 4.0], np.float32)]

    same, norm = clip_update_norm(update, 5.0)

    assert same is update and norm == 5.0


def test_no_bound_means_no_clipping():
    update = [np.full(4, 1e6, np.float32)]

    same, norm = clip_update_norm(update, None)

    assert same is update and norm == pytest.approx(2e6)


def test_a_non_finite_update_is_left_for_the_caller_to_refuse():
    update = [np.array([1.0, np.nan], np.float32)]

    same, norm = clip_update_norm(update, 1.0)

    assert same is update and math.isnan(norm)


@settings(max_examples=60, deadline=None)
@given(
    values=arrays(
        np.float32,
        st.integers(1, 300),
        elements=st.floats(allow_nan=False, allow_infinity=False, width=32),
    ),
    split=st.integers(0, 300),
    bound=st.floats(1e-3, 1e3),
)
def test_clipped_norm_never_exceeds_the_bound_and_keeps_the_direction(values, split, bound):
    update = [values[:split], values[split:]]

    clipped, norm = clip_update_norm(update, bound)

    assert norm == pytest.approx(_norm(update), rel=1e-12)
    after = _norm(clipped)
    assert after <= bound * (1 + 1e-6)
    if norm > bound:
        assert after == pytest.approx(bound, rel=1e-6)
        flat_in = np.concatenate([u.ravel() for u in update]).astype(np.float64)
        flat_out = np.concatenate([c.ravel() for c in clipped]).astype(np.float64)
        # Every value is scaled by the same factor (up to float32 rounding).
        np.testing.assert_allclose(flat_out, flat_in * (bound / norm), rtol=1e-6, atol=1e-30)


# ------------------------------------------------------------ config
def test_default_bound_fits_inside_the_secagg_range():
    cfg = FedloraConfig()
    assert cfg.privacy.max_update_norm == 64.0
    assert cfg.privacy.max_update_norm <= cfg.secagg.clipping_range


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"privacy": {"max_update_norm": 65.0}}, r"max_update_norm \(65\) exceeds"),
        (
            {"privacy": {"max_update_norm": 10.0}, "secagg": {"clipping_range": 8.0}},
            r"exceeds secagg.clipping_range \(8\)",
        ),
        (  # the rule holds without SecAgg too: plain updates are range-checked alike
            {
                "privacy": {"max_update_norm": 10.0},
                "secagg": {"enabled": False, "clipping_range": 8.0},
            },
            "exceeds",
        ),
        ({"privacy": {"max_update_norm": 0}}, "must be a positive number"),
        ({"privacy": {"max_update_norm": -1.0}}, "must be a positive number"),
        ({"privacy": {"max_update_norm": float("inf")}}, "must be a positive number"),
        ({"privacy": {"max_update_norm": "64"}}, "must be a number"),
    ],
)
def test_bad_bounds_are_refused_in_one_line(data, match):
    with pytest.raises(ConfigError, match=match) as info:
        FedloraConfig.from_dict(data)
    assert "\n" not in str(info.value)


def test_a_null_bound_and_a_bound_equal_to_the_range_are_accepted():
    unbounded = FedloraConfig.from_dict({"privacy": {"max_update_norm": None}})
    assert unbounded.privacy.max_update_norm is None
    cfg = FedloraConfig.from_dict(
        {"privacy": {"max_update_norm": 8.0}, "secagg": {"clipping_range": 8.0}}
    )
    assert cfg.privacy.max_update_norm == 8.0
    assert FedloraConfig.from_dict(cfg.to_dict()) == cfg


def test_a_version_1_run_config_reloads_as_the_unclipped_run_it_was(tmp_path):
    """RUN_DIR/config.json from before the bound existed: clipping_range 8, no
    max_update_norm. It reloads (for `fedlora report`, the PrivacyService, a rerun)
    with no bound, instead of being refused for 64 > 8."""
    old = FedloraConfig().to_dict()
    old["version"] = 1
    del old["privacy"]["max_update_norm"]
    old["secagg"]["clipping_range"] = 8.0
    old["versions"] = {"fedlora": "0.1"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))

    cfg = load_config(path)

    assert cfg.privacy.max_update_norm is None and cfg.secagg.clipping_range == 8.0
    assert cfg.to_dict()["version"] == CONFIG_VERSION
    assert FedloraConfig.from_dict({"version": 1}).secagg.clipping_range == 8.0  # v1 default
    assert FedloraConfig.from_dict({}).privacy.max_update_norm == 64.0  # a file without one


# ------------------------------------------------------------ DeviceClient.fit
@pytest.fixture
def tiny_device(monkeypatch):
    """DeviceClient.fit on a 1-layer LLaMA (no embedded model build): the real DP-SGD step,
    the real update, only the model and the data are stand-ins."""
    model = tiny_lora_model(seed=0)
    initial = [p.detach().numpy().copy() for n, p in model.named_parameters() if "lora_" in n]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (20, 12), generator=g)
    mask = torch.ones_like(ids)
    device = SimpleNamespace(device="d0", train=tuple(f"r{i}" for i in range(20)), heldout=())
    monkeypatch.setattr(runtime, "model_bundle", lambda cfg: SimpleNamespace(model=model))
    monkeypatch.setattr(runtime, "device_info", lambda cfg, i: ("d0", len(device.train)))
    monkeypatch.setattr(runtime, "device_data", lambda cfg, i: device)
    monkeypatch.setattr(runtime, "encoded", lambda cfg, name, texts: (ids, mask))
    contexts: list[Context] = []

    def fit(max_update_norm, learning_rate=0.5):
        from fedlora.adapter import set_adapter_arrays

        set_adapter_arrays(model, initial)
        cfg = FedloraConfig().replace(
            # reproducible_noise: the two fits below compare one update, clipped and not.
            privacy={
                "max_update_norm": max_update_norm,
                "noise_multiplier": 1.0,
                "reproducible_noise": True,
            },
            training={"local_steps": 3, "batch_size": 5, "learning_rate": learning_rate},
        )
        ctx = Context(
            run_id=3, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
        )
        contexts.append(ctx)
        return DeviceClient(cfg, ctx).fit(
            [a.copy() for a in initial], {ROUND_KEY: 1, NUM_ROUNDS_KEY: 5}
        )

    fit.contexts = contexts  # type: ignore[attr-defined]
    return fit


def test_fit_sends_the_clipped_update_and_reports_the_norm_before(tiny_device):
    free, _, free_metrics = tiny_device(None)
    clipped, n, metrics = tiny_device(1e-3)

    # Same seed, same noise: the unclipped run shows what the clipped one started from.
    assert free_metrics["clipped"] is False
    assert free_metrics["update_norm"] == pytest.approx(_norm(free), rel=1e-9)
    assert metrics["update_norm"] == pytest.approx(_norm(free), rel=1e-6)
    assert metrics["update_norm"] > 1e-3
    assert metrics["clipped"] is True
    assert _norm(clipped) == pytest.approx(1e-3, rel=1e-5)
    assert n == 20 and metrics["round"] == 1 and metrics["dp"] is True


def test_fit_refuses_to_send_a_diverged_update_but_records_what_it_spent(tiny_device):
    from fedlora.client.ledger import load_device_ledger

    with pytest.raises(UpdateError, match="diverged"):
        tiny_device(None, learning_rate=1e38)

    (ctx,) = tiny_device.contexts
    assert load_device_ledger(ctx).rounds_for("d0") == (1,)
