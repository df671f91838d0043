"""Canaries for the privacy audit: seeded, fair coins, and only through the audit's seam."""

import inspect

import numpy as np
import pytest

from fedlora import runtime
from fedlora.config import FedloraConfig
from fedlora.data.canaries import REPEATS, WORDS, draw_canaries
from fedlora.data.fleet import DeviceData
from fedlora.errors import ConfigError


def test_draws_are_seeded_distinct_and_fair():
    a = draw_canaries(400, 20, seed=3)
    assert a == draw_canaries(400, 20, seed=3)
    assert a.texts != draw_canaries(400, 20, seed=4).texts
    assert len(set(a.texts)) == 400
    assert 160 < int(a.included.sum()) < 240  # Binomial(400, ½): 200 ± 40 is > 4σ
    devices = {c.device_index for c in a.canaries}
    assert devices <= set(range(20)) and len(devices) == 20
    phrase = a.texts[0].split(". ")[0]
    assert len(phrase.split(" ")) == WORDS
    assert a.texts[0] == ". ".join([phrase] * REPEATS) + "."


def test_vocabulary_words_are_used():
    plan = draw_canaries(10, 2, seed=0, vocabulary=["alpha", "beta", "gamma"])
    assert set(plan.texts[0].replace(".", "").split()) <= {"alpha", "beta", "gamma"}


def test_apply_appends_only_this_devices_inserted_canaries():
    plan = draw_canaries(50, 3, seed=1)
    data = DeviceData(device="d", train=("a", "b"), heldout=("h",))
    for index in range(3):
        mine = [c.text for c in plan.canaries if c.device_index == index and c.included]
        out = plan.apply(index, data)
        assert out.train == ("a", "b", *mine)
        assert out.heldout == ("h",)
        assert out == plan(index, data)  # the data hook's call form
    assert plan.apply(7, data) is data


def test_refuses_too_few_canaries():
    with pytest.raises(ConfigError):
        draw_canaries(1, 3, seed=0)


def test_default_data_building_has_no_canary_seam():
    # Canaries reach a device only through the data hook the audit passes; the fleet
    # builder and a plain ``simulate`` have no such input, and a default device's
    # records hold no canary.
    from fedlora.data import fleet

    assert "canar" not in inspect.signature(fleet.build_fleet).parameters
    assert "data_hook" not in inspect.signature(runtime.device_data).parameters
    cfg = FedloraConfig().replace(fleet={"num_devices": 3, "devices_per_round": 3})
    plan = draw_canaries(30, 3, seed=cfg.seed)
    records = set(runtime.device_data(cfg, 0).train)
    assert not records & set(plan.texts)
    assert np.all([len(t) > 0 for t in plan.texts])
