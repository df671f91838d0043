"""Config: defaults, validation, unknown keys, round trip, file loading."""

from __future__ import annotations

import json

import pytest

from fedlora.config import (
    CONFIG_VERSION,
    DEFAULT_LEARNING_RATE,
    FedloraConfig,
    PrivacySection,
    SecAggSection,
    config_from_run_config,
    load_config,
)
from fedlora.errors import ConfigError


def test_defaults_meet_the_promised_run():
    cfg = FedloraConfig()
    assert cfg.fleet.num_devices >= 20 and cfg.training.rounds >= 5
    assert cfg.privacy.enabled and cfg.privacy.epsilon <= 8 and cfg.privacy.delta <= 1e-5
    assert cfg.secagg.enabled


def test_round_trip_through_dict_and_json(tmp_path):
    cfg = FedloraConfig().replace(
        training={"rounds": 3}, seed=7, lora={"target_modules": ["q_proj"]}
    )
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg.to_dict()))
    again = load_config(path)
    assert again == cfg and again.lora.target_modules == ("q_proj",)


def test_toml_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("seed = 3\n[training]\nrounds = 2\n")
    cfg = load_config(path)
    assert cfg.seed == 3 and cfg.training.rounds == 2


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"trainig": {}}, "unknown config key 'trainig'"),
        ({"training": {"roundz": 3}}, r"unknown config key training\.'roundz'"),
        ({"training": {"rounds": "5"}}, "must be an integer"),
        ({"training": {"rounds": True}}, "must be an integer"),
        ({"privacy": {"epsilon": 0}}, "epsilon must be a positive"),
        ({"privacy": {"epsilon": -1.0}}, "epsilon must be a positive"),
        ({"privacy": {"delta": 1.5}}, "delta must be in"),
        ({"privacy": {"accountant": "gdp"}}, "prv or rdp"),
        ({"privacy": {"reproducible_noise": "yes"}}, "reproducible_noise must be true or false"),
        ({"privacy": {"reproducible_noise": 1}}, "reproducible_noise must be true or false"),
        ({"fleet": {"num_devices": 4, "devices_per_round": 10}}, "exceeds"),
        ({"data": {"partition": "random"}}, "natural, iid or dirichlet"),
        ({"training": []}, "must be an object"),
        ({"fleet": {"min_devices": 2, "devices_per_round": 5}}, "SecAgg\\+ needs at least 3"),
    ],
)
def test_invalid_configs_are_refused_with_one_line(data, match):
    with pytest.raises(ConfigError, match=match) as info:
        FedloraConfig.from_dict(data)
    assert "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


def test_run_config_resolution(tmp_path):
    cfg = FedloraConfig().replace(seed=11)
    assert config_from_run_config({"fedlora-config-json": json.dumps(cfg.to_dict())}) == cfg
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"seed": 5}))
    assert config_from_run_config({"fedlora-config": str(path)}).seed == 5
    assert config_from_run_config({}) == FedloraConfig()


def test_a_run_config_json_reloads(tmp_path):
    """RUN_DIR/config.json carries 'resolved' and 'versions' beside the settings."""
    cfg = FedloraConfig().replace(seed=2, export={"profile": "phone-high"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**cfg.to_dict(), "resolved": {"devices": 20}, "versions": {}}))
    assert load_config(path) == cfg


def test_dp_noise_is_not_reproducible_unless_asked():
    """Default: devices draw noise from their OS CSPRNG; the research option round-trips."""
    assert FedloraConfig().privacy.reproducible_noise is False
    assert FedloraConfig.from_dict({}).privacy.reproducible_noise is False
    saved = FedloraConfig().replace(privacy={"reproducible_noise": True}).to_dict()
    assert saved["version"] == CONFIG_VERSION == 6
    assert saved["privacy"]["reproducible_noise"] is True
    assert FedloraConfig.from_dict(json.loads(json.dumps(saved))).privacy.reproducible_noise
    with pytest.raises(ConfigError, match="must be true or false, got 'no'"):
        PrivacySection(reproducible_noise="no")  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [1, 2, 3])
def test_an_older_config_loads_with_the_seeded_noise_it_ran_with(tmp_path, version):
    """Before version 4 every device seeded its noise from the run's seed: an old
    RUN_DIR/config.json reloads (and is reported) as reproducible, not as secure."""
    old = {"format": "fedlora.config", "version": version, "seed": 3, "privacy": {}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))

    cfg = load_config(path)

    assert cfg.privacy.reproducible_noise is True
    explicit = {**old, "privacy": {"reproducible_noise": False}}
    assert FedloraConfig.from_dict(explicit).privacy.reproducible_noise is False
    assert FedloraConfig.from_dict({"version": version}).privacy.reproducible_noise is True


def test_secagg_defaults_to_the_sparse_graph_and_round_trips():
    s = FedloraConfig().secagg
    assert (s.num_shares, s.reconstruction_threshold, s.dropout_rate) == (None, None, 0.1)
    saved = FedloraConfig().replace(secagg={"dropout_rate": 0.3}).to_dict()
    assert saved["secagg"]["num_shares"] is None and saved["secagg"]["dropout_rate"] == 0.3
    assert FedloraConfig.from_dict(json.loads(json.dumps(saved))).secagg == SecAggSection(
        dropout_rate=0.3
    )
    full = FedloraConfig.from_dict({"secagg": {"num_shares": 1.0}}).secagg
    assert (full.num_shares, full.reconstruction_threshold) == (1.0, None)


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_an_older_config_keeps_the_full_secagg_graph_it_ran_with(tmp_path, version):
    """Before version 5 every device shared its secrets with every other (num_shares 1.0,
    threshold 0.6): an old file that set nothing reloads with that, not the sparse graph."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"format": "fedlora.config", "version": version, "seed": 3}))

    s = load_config(path).secagg

    assert (s.num_shares, s.reconstruction_threshold) == (1.0, 0.6)
    own = {"version": version, "secagg": {"num_shares": 0.5, "timeout_s": 9.0}}
    s = FedloraConfig.from_dict(own).secagg
    assert (s.num_shares, s.reconstruction_threshold, s.timeout_s) == (0.5, 0.6, 9.0)


def test_learning_rate_defaults_to_the_variants_measured_best_and_round_trips():
    """null: LoRA 0.2, FFA-LoRA 0.5 (the measured best at ε = 8); a number is kept as is."""
    lora, ffa = FedloraConfig(), FedloraConfig().replace(lora={"variant": "ffa"})

    assert lora.training.learning_rate is None and ffa.training.learning_rate is None
    assert (lora.learning_rate, ffa.learning_rate) == (0.2, 0.5)
    assert DEFAULT_LEARNING_RATE == {"lora": 0.2, "ffa": 0.5}
    assert ffa.replace(training={"learning_rate": 0.35}).learning_rate == 0.35
    saved = json.loads(json.dumps(ffa.to_dict()))
    assert saved["training"]["learning_rate"] is None
    assert FedloraConfig.from_dict(saved).learning_rate == 0.5


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5])
def test_an_older_config_keeps_the_learning_rate_it_ran_with(tmp_path, version):
    """Before version 6 a file that did not set training.learning_rate trained at 0.2 with
    either variant: it reloads at 0.2, not at FFA's 0.5 that null now means."""
    old = {"format": "fedlora.config", "version": version, "lora": {"variant": "ffa"}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))

    cfg = load_config(path)

    assert cfg.training.learning_rate == 0.2 and cfg.learning_rate == 0.2
    own = {**old, "training": {"learning_rate": 0.5, "rounds": 2}}
    assert FedloraConfig.from_dict(own).learning_rate == 0.5


@pytest.mark.parametrize("lr", [0.0, -0.1, float("inf"), float("nan")])
def test_a_learning_rate_that_is_not_a_positive_number_is_refused(lr):
    with pytest.raises(ConfigError, match=r"training\.learning_rate must be a positive number"):
        FedloraConfig.from_dict({"training": {"learning_rate": lr}})


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"dropout_rate": 0.5}, r"secagg.dropout_rate .* in \[0, 0.5\)"),
        ({"dropout_rate": -0.1}, "secagg.dropout_rate"),
        ({"num_shares": 0.0}, r"secagg.num_shares is a fraction in \(0, 1\]"),
        ({"reconstruction_threshold": 1.5}, "secagg.reconstruction_threshold"),
    ],
)
def test_invalid_secagg_graph_settings_are_refused(values, match):
    with pytest.raises(ConfigError, match=match):
        FedloraConfig.from_dict({"secagg": values})


def test_fedlora_run_refuses_reproducible_noise_before_submitting(tmp_path):
    """A deployed run's devices would refuse it anyway; `fedlora run` says so up front."""
    import argparse

    from fedlora.cli.run import resolve_run_config

    research = tmp_path / "research.json"
    research.write_text(json.dumps({"privacy": {"reproducible_noise": True}}))
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"version": 3, "seed": 2}))
    for path in (research, old):
        with pytest.raises(ConfigError) as info:
            resolve_run_config(argparse.Namespace(config=str(path), name="r1", resume=None))
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"{path}: privacy.reproducible_noise")
        assert "set it to false" in msg
    fine = tmp_path / "fine.json"
    fine.write_text(json.dumps({"version": 3, "privacy": {"reproducible_noise": False}}))
    cfg, name = resolve_run_config(argparse.Namespace(config=str(fine), name="r1", resume=None))
    assert cfg is not None and not cfg.privacy.reproducible_noise and name == "r1"
