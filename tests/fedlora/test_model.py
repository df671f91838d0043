"""The base model: build once and cache, load through from_pretrained, refuse non-causal LMs."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from fedlora import model as model_mod
from fedlora.errors import ConfigError, ModelError
from fedlora.model import (
    BUILD_INFO,
    BaseModelSpec,
    default_model_path,
    load_base_model,
    mean_token_loss,
    model_fingerprint,
    train_tokenizer,
)

TINY = BaseModelSpec(
    name="test-tiny",
    vocab_size=320,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    intermediate_size=64,
    max_positions=64,
    public_records=300,
    pretrain_steps=5,
    batch_size=8,
    seq_len=32,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return default_model_path(tmp_path_factory.mktemp("cache"), TINY)


def test_default_model_builds_into_a_keyed_cache_dir(built: Path) -> None:
    info = json.loads((built / BUILD_INFO).read_text())

    assert built.name == TINY.cache_key() and built.name.startswith("test-tiny-")
    assert {p.name for p in built.iterdir()} >= {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", BUILD_INFO
    }  # fmt: skip
    assert not [p for p in built.parent.iterdir() if ".tmp-" in p.name]
    assert info["spec"]["hidden_size"] == 32 and info["parameters"] > 0
    assert info["pretrain_last_loss"] < info["pretrain_first_loss"]


def test_second_call_reuses_the_cache_without_building(
    built: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_build(*_: object) -> None:
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(model_mod, "_build", no_build)

    assert default_model_path(built.parent, TINY) == built


def test_cache_root_follows_fedlora_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(model_mod, "_build", _fake_build)

    path = default_model_path(spec=TINY)

    assert path == tmp_path / "models" / TINY.cache_key()


def test_a_crashed_build_leaves_no_cache_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(spec: BaseModelSpec, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(model_mod, "_build", crash)

    with pytest.raises(RuntimeError):
        default_model_path(tmp_path, TINY)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_concurrent_callers_build_once_and_share_the_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[int] = []

    def slow_build(spec: BaseModelSpec, out: Path) -> None:
        builds.append(1)
        time.sleep(0.3)
        _fake_build(spec, out)

    monkeypatch.setattr(model_mod, "_build", slow_build)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(default_model_path(tmp_path, TINY)))
        for _ in range(4)
    ]

    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(builds) == 1
    assert results == [tmp_path / TINY.cache_key()] * 4


def _fake_build(spec: BaseModelSpec, out: Path) -> None:
    (out / "config.json").write_text("{}")
    (out / BUILD_INFO).write_text("{}")


def test_built_model_loads_with_from_pretrained_in_fp32(built: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model, tokenizer = load_base_model(built)
    direct = AutoModelForCausalLM.from_pretrained(built, local_files_only=True)
    ids = torch.tensor([[tokenizer.bos_token_id, 50, 60, 70]])

    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer.pad_token == "<pad>" and model.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits)


def test_tokenizer_round_trips_non_ascii_text(built: Path) -> None:
    _, tokenizer = load_base_model(built)
    text = "Zoë's café — 東京で会おう 🎉\n  two  spaces, Łukasz & Søren"

    ids = tokenizer(text)["input_ids"]

    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.unk_token_id not in ids


def test_mean_token_loss_is_lower_on_text_like_the_pretraining(built: Path) -> None:
    model, tokenizer = load_base_model(built)

    familiar = mean_token_loss(model, tokenizer, ["Call mum on Monday."] * 4, seq_len=32)
    noise = mean_token_loss(model, tokenizer, ["qzx vwk jjq pfft"] * 4, seq_len=32)

    assert 0 < familiar < noise


def test_fingerprint_follows_config_and_weights(built: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(built, tmp_path / "copy"))
    same = model_fingerprint(copy)
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:-1] + b"!")

    assert same == model_fingerprint(built) and len(same) == 64
    assert model_fingerprint(copy) != same
    with pytest.raises(ModelError, match=r"no config\.json"):
        model_fingerprint(tmp_path)


def test_missing_and_non_model_paths_are_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_base_model(tmp_path / "absent")
    with pytest.raises(ModelError, match="not a Hugging Face model directory"):
        load_base_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read"):
        load_base_model(tmp_path)


def test_an_encoder_checkpoint_is_refused_naming_what_was_found(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32,
    )  # fmt: skip
    BertModel(config).save_pretrained(tmp_path)

    with pytest.raises(
        ModelError, match=r"'bert' model \(BertModel\), not a causal language model"
    ):
        load_base_model(tmp_path)


def test_a_checkpoint_without_tokenizer_is_refused(built: Path, tmp_path: Path) -> None:
    for name in ("config.json", "model.safetensors"):
        shutil.copy(built / name, tmp_path / name)

    with pytest.raises(ModelError, match="tokenizer"):
        load_base_model(tmp_path)


def test_a_tokenizer_without_pad_gets_eos_as_pad(built: Path, tmp_path: Path) -> None:
    for name in ("config.json", "model.safetensors"):
        shutil.copy(built / name, tmp_path / name)
    tokenizer = train_tokenizer(["Buy milk.", "Call mum."] * 20, vocab_size=280, max_length=64)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)

    _, loaded = load_base_model(tmp_path)

    assert loaded.pad_token == loaded.eos_token == "</s>"


def test_invalid_specs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="heads"):
        BaseModelSpec(hidden_size=100, num_heads=3)
    with pytest.raises(ConfigError, match="positive integer"):
        BaseModelSpec(num_layers=0)
    with pytest.raises(ConfigError, match="exceeds max_positions"):
        BaseModelSpec(seq_len=512)


def test_the_cache_key_changes_with_the_spec() -> None:
    assert BaseModelSpec().cache_key() != BaseModelSpec(seed=1).cache_key()
    assert BaseModelSpec().cache_key() == BaseModelSpec().cache_key()


@pytest.mark.slow
def test_the_default_base_knows_public_text_better_than_private_text() -> None:
    from fedlora.data.synthetic import default_records

    path = default_model_path()  # the session's cache: shared with the end-to-end tests
    model, tokenizer = load_base_model(path)
    public = [r.text for r in default_records(1, seed=1, split="public", num_records=300)]
    private = [r.text for r in default_records(20, seed=0)][::8]

    public_loss = mean_token_loss(model, tokenizer, public, seq_len=64)
    private_loss = mean_token_loss(model, tokenizer, private, seq_len=64)

    # Build time (~40 s on 2 idle cores) is recorded in fedlora_base.json, not asserted:
    # it depends on how busy the machine is.
    assert public_loss < 1.0 < private_loss
