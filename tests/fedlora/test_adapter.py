"""LoRA: only adapter tensors train, arrays round-trip, bad updates change nothing, saves reload."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.adapter import (
    LoraSettings,
    adapter_names,
    attach_lora,
    get_adapter_arrays,
    lora_targets,
    read_adapter_metadata,
    save_adapter,
    set_adapter_arrays,
)
from fedlora.config import LLAMA_LINEAR_MODULES, FedloraConfig
from fedlora.errors import ConfigError, ModelError, UpdateError

HIDDEN, INTER, LAYERS, VOCAB = 32, 48, 2, 64


def _base(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def _randomised(model, seed: int = 1) -> list[np.ndarray]:
    """Give lora_B non-zero values so the adapter changes the output."""
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(0, 0.1, a.shape).astype(np.float32) for a in get_adapter_arrays(model)]
    set_adapter_arrays(model, arrays)
    return arrays


INPUT = torch.tensor([[1, 5, 9, 13, 17, 21], [2, 4, 6, 8, 10, 12]])


def test_only_lora_tensors_are_trainable_with_the_expected_count() -> None:
    settings = LoraSettings(r=4, alpha=8)

    model = attach_lora(_base(), settings)

    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    per_layer = 4 * 4 * (HIDDEN + HIDDEN) + 2 * 4 * (HIDDEN + INTER) + 4 * (INTER + HIDDEN)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(trainable.values()) == LAYERS * per_layer
    assert list(trainable) == adapter_names(model)


def test_a_missing_target_module_names_it_and_the_linear_layers() -> None:
    with pytest.raises(ModelError) as err:
        attach_lora(_base(), LoraSettings(target_modules=("q_proj", "c_attn")))

    message = str(err.value)
    assert "c_attn" in message and "q_proj" in message.split("linear layers are:")[1]
    assert "\n" not in message


def test_the_default_targets_are_every_projection_of_a_llama_and_are_recorded(
    tmp_path: Path,
) -> None:
    model = attach_lora(_base(), LoraSettings())

    out = save_adapter(model, tmp_path / "adapter")

    assert lora_targets(model) == list(LLAMA_LINEAR_MODULES)
    saved = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert sorted(saved) == sorted(LLAMA_LINEAR_MODULES)
    assert read_adapter_metadata(out)["lora_target_modules"] == list(LLAMA_LINEAR_MODULES)


def test_an_explicit_list_is_honoured_as_given() -> None:
    model = attach_lora(_base(), LoraSettings(target_modules=("v_proj", "q_proj")))

    assert lora_targets(model) == ["q_proj", "v_proj"]  # in the model's order
    assert {n.split(".")[-4] for n in adapter_names(model)} == {"q_proj", "v_proj"}


def _relabelled(model_type: str):
    model = _base()
    model.config.model_type = model_type
    return model


def test_an_unknown_family_with_every_llama_projection_gets_the_old_default() -> None:
    model = attach_lora(_relabelled("my-llama-fork"), LoraSettings())

    assert lora_targets(model) == list(LLAMA_LINEAR_MODULES)


def test_an_unknown_family_without_them_is_refused_naming_its_linear_layers() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB))
    base.get_submodule("transformer.h.0.mlp").c_fc = torch.nn.Linear(16, 64)  # one nn.Linear

    with pytest.raises(ModelError) as err:
        attach_lora(base, LoraSettings())

    message = str(err.value)
    assert "'gpt2'" in message and "lora.target_modules" in message and "c_fc" in message
    assert "\n" not in message


def test_a_family_default_that_does_not_match_is_refused_like_a_list() -> None:
    with pytest.raises(ModelError, match=r"qkv_proj.*its linear layers are: .*q_proj"):
        attach_lora(_relabelled("phi3"), LoraSettings())


def test_config_files_that_list_targets_keep_them_and_the_default_round_trips() -> None:
    listed = FedloraConfig.from_dict({"lora": {"target_modules": list(LLAMA_LINEAR_MODULES)}})
    default = FedloraConfig()

    assert listed.lora.target_modules == LLAMA_LINEAR_MODULES
    assert default.lora.target_modules is None
    assert default.to_dict()["lora"]["target_modules"] is None
    assert FedloraConfig.from_dict(default.to_dict()) == default


def test_dotted_suffix_targets_are_accepted_like_peft_does() -> None:
    model = attach_lora(_base(), LoraSettings(target_modules=("self_attn.q_proj",)))

    assert all("self_attn.q_proj" in n for n in adapter_names(model))


def test_seeded_attach_is_reproducible_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)

    first = get_adapter_arrays(attach_lora(_base(), LoraSettings(), seed=5))
    after = torch.rand(1)
    second = get_adapter_arrays(attach_lora(_base(), LoraSettings(), seed=5))

    assert torch.equal(after, expected_next)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_a_fresh_adapter_computes_exactly_what_the_base_does() -> None:
    base_logits = _base()(INPUT).logits

    with torch.no_grad():
        adapted = attach_lora(_base(), LoraSettings(), seed=0)(INPUT).logits

    torch.testing.assert_close(adapted, base_logits, atol=0, rtol=0)


def test_arrays_round_trip_as_float32_copies() -> None:
    model = attach_lora(_base(), LoraSettings(r=2))
    sent = _randomised(model)

    got = get_adapter_arrays(model)
    got[0][...] = 99.0  # a copy: changing it does not change the model

    assert all(a.dtype == np.float32 for a in got)
    assert np.array_equal(get_adapter_arrays(model)[0], sent[0])
    assert all(
        np.array_equal(a, b) for a, b in zip(get_adapter_arrays(model)[1:], sent[1:], strict=True)
    )


def _bad_last(arrays: list[np.ndarray], bad: np.ndarray) -> list[np.ndarray]:
    """Valid new values everywhere except the last array, which is ``bad``."""
    return [a + 1.0 for a in arrays[:-1]] + [bad]


@pytest.mark.parametrize(
    ("make_bad", "match"),
    [
        (lambda a: _bad_last(a, np.zeros((3, 3), np.float32)), "shape"),
        (lambda a: _bad_last(a, np.full(a[-1].shape, np.nan, np.float32)), "NaN"),
        (lambda a: _bad_last(a, np.full(a[-1].shape, np.inf, np.float32)), "infinite"),
        (lambda a: _bad_last(a, a[-1].astype(np.float64)), "float64, expected float32"),
        (lambda a: _bad_last(a, a[-1].tolist()), "not a numpy array"),
        (lambda a: a[:-1], "has .* arrays but the adapter has"),
    ],
)
def test_a_bad_update_raises_and_changes_nothing(make_bad, match: str) -> None:
    model = attach_lora(_base(), LoraSettings(r=2))
    before = _randomised(model)

    with pytest.raises(UpdateError, match=match):
        set_adapter_arrays(model, make_bad(get_adapter_arrays(model)))

    assert all(np.array_equal(a, b) for a, b in zip(get_adapter_arrays(model), before, strict=True))


def test_saved_adapter_reloads_with_peft_and_gives_identical_logits(tmp_path: Path) -> None:
    from peft import PeftModel

    model = attach_lora(_base(), LoraSettings(r=4))
    _randomised(model)
    with torch.no_grad():
        expected = model(INPUT).logits

    out = save_adapter(model, tmp_path / "adapter", metadata={"round": 3, "base": "abc"})
    reloaded = PeftModel.from_pretrained(_base(), out)
    with torch.no_grad():
        got = reloaded(INPUT).logits

    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert read_adapter_metadata(out) == {
        "round": 3,
        "base": "abc",
        "lora_target_modules": list(LLAMA_LINEAR_MODULES),
    }
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert not torch.allclose(got, _base()(INPUT).logits)  # the adapter mattered


def test_saving_again_replaces_the_adapter_and_leaves_no_temporaries(tmp_path: Path) -> None:
    model = attach_lora(_base(), LoraSettings(r=2))
    save_adapter(model, tmp_path / "adapter", metadata={"round": 1})

    save_adapter(model, tmp_path / "adapter", metadata={"round": 2})

    assert read_adapter_metadata(tmp_path / "adapter")["round"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_unserialisable_metadata_is_refused_before_writing(tmp_path: Path) -> None:
    model = attach_lora(_base(), LoraSettings(r=2))

    with pytest.raises(ModelError, match="JSON"):
        save_adapter(model, tmp_path / "adapter", metadata={"when": object()})
    assert not (tmp_path / "adapter").exists()


def test_models_without_lora_are_refused() -> None:
    with pytest.raises(ModelError, match="attach_lora"):
        get_adapter_arrays(_base())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": True}, "r must be a positive integer"),
        ({"alpha": -1}, "alpha must be positive"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"target_modules": "q_proj"}, "list of module names"),
        ({"target_modules": ()}, "non-empty"),
        ({"target_modules": ("q_proj", "q_proj")}, "unique"),
    ],
)
def test_invalid_lora_settings_are_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LoraSettings(**kwargs)


def test_target_modules_given_as_a_list_become_a_tuple() -> None:
    settings = LoraSettings(target_modules=["q_proj", "v_proj"])  # type: ignore[arg-type]

    assert settings.target_modules == ("q_proj", "v_proj")
    assert hash(settings) == hash(LoraSettings(target_modules=("q_proj", "v_proj")))
