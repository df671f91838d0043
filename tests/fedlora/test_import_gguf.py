"""``fedlora models import-gguf``: GGUF in, a checkpoint fedlora trains on out, or nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora import gguf_import
from fedlora.cli import main
from fedlora.errors import ModelError
from fedlora.export.manifest import sha256_file
from fedlora.gguf_import import IMPORT_INFO, import_gguf
from fedlora.model import load_base_model
from tests.fedlora.tiny_import import NON_ASCII, TinyCheckpoints, build, leftovers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoints:
    torch.set_num_threads(1)
    return build(tmp_path_factory.mktemp("tiny-import"))


@pytest.fixture(scope="module")
def imported_f32(tiny: TinyCheckpoints, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imports") / "f32"
    import_gguf(tiny.f32, out, notify=lambda _: None)
    return out


@pytest.fixture(scope="module")
def imported_q8(tiny: TinyCheckpoints, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imports") / "q8_0"
    import_gguf(tiny.q8_0, out, notify=lambda _: None)
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    model, _ = load_base_model(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_an_f32_gguf_comes_back_bit_for_bit(tiny: TinyCheckpoints, imported_f32: Path) -> None:
    original, back = _weights(tiny.hf), _weights(imported_f32)

    assert back.keys() == original.keys()
    for name, weight in original.items():
        assert torch.equal(back[name], weight), name  # q/k un-permuted exactly too


def test_q8_0_weights_come_back_within_a_q8_0_step(
    tiny: TinyCheckpoints, imported_q8: Path
) -> None:
    original, back = _weights(tiny.hf), _weights(imported_q8)

    for name, weight in original.items():
        if weight.dim() < 2:  # norms stay F32 in the file
            assert torch.equal(back[name], weight), name
            continue
        # Q8_0: blocks of 32 along a row, x ≈ d·q with d = max|x| / 127 stored as F16, so
        # |error| <= d/2 (rounding q) + 127·d·2^-11 (rounding d) < 0.57·d.
        blocks = weight.reshape(-1, 32)
        step = blocks.abs().amax(dim=1, keepdim=True) / 127
        error = (back[name].reshape(-1, 32) - blocks).abs()
        assert bool((error <= 0.57 * step + 1e-9).all()), name
        assert not torch.equal(back[name], weight), f"{name} was not quantized at all"


def test_the_tokenizer_round_trips_non_ascii_text(tiny: TinyCheckpoints, imported_q8: Path) -> None:
    from fedlora.export.gguf import LlamaCppModel

    _, original = load_base_model(tiny.hf)
    _, back = load_base_model(imported_q8)
    llama = LlamaCppModel(tiny.q8_0)

    ids = back(NON_ASCII)["input_ids"]

    assert ids == original(NON_ASCII)["input_ids"]
    assert ids == llama.tokenize(NON_ASCII)  # and as llama.cpp reads the GGUF
    assert back.decode(ids, skip_special_tokens=True) == NON_ASCII
    assert back.pad_token is not None


def test_the_record_says_where_the_weights_came_from(
    tiny: TinyCheckpoints, imported_q8: Path
) -> None:
    import transformers

    info = json.loads((imported_q8 / IMPORT_INFO).read_text(encoding="utf-8"))

    assert info["format"] == "fedlora.gguf-import"
    source = info["source"]
    assert source["file"] == str(tiny.q8_0.absolute())
    assert source["sha256"] == sha256_file(tiny.q8_0)
    assert source["bytes"] == tiny.q8_0.stat().st_size
    assert source["architecture"] == "llama"
    assert source["file_type"] == "MOSTLY_Q8_0"
    assert source["tensor_types"] == {"F32": 3, "Q8_0": 8}  # 3 norms; embedding, q k v o, 3 MLP
    assert info["dequantized"]["from"] == ["Q8_0"]
    assert info["dequantized"]["to"] == "float32"
    assert info["model"]["class"] == "LlamaForCausalLM"
    assert info["model"]["parameters"] == load_base_model(tiny.hf)[0].num_parameters()
    assert info["verified"]["reload_max_abs_logit_diff"] == 0.0
    assert info["versions"]["transformers"] == transformers.__version__
    assert info["imported_at"].endswith("Z")
    assert sorted(p.name for p in imported_q8.iterdir()) == sorted(
        [IMPORT_INFO, "config.json", "generation_config.json", "model.safetensors"]
        + [p.name for p in imported_q8.glob("tokenizer*")]
    )
    assert "quantization_config" not in json.loads((imported_q8 / "config.json").read_text())
    assert leftovers(imported_q8) == []


# ------------------------------------------------------------------ the command


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["models", "import-gguf", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_imports_and_says_how_to_use_it(
    tiny: TinyCheckpoints, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "models" / "tiny"

    code, stdout, stderr = _run(capsys, str(tiny.q8_0), "--out", str(out))

    assert code == 0
    assert f"use it as --model {out}" in stdout
    assert "Q8_0 → float32" in stdout
    assert "dequantizing tiny-q8_0.gguf" in stderr
    assert (out / IMPORT_INFO).is_file()
    assert leftovers(out) == []


def _garbage(tmp_path: Path) -> Path:
    path = tmp_path / "notes.gguf"
    path.write_text("this is not a model\n")
    return path


def _other_arch(tmp_path: Path) -> Path:
    import gguf

    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "nosucharch")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "missing.gguf", "missing.gguf does not exist"),
        (_garbage, "is not a GGUF file (it starts with b'this'"),
        (lambda tmp: tmp, "is not a file; pass a .gguf file"),
        (_other_arch, "holds a 'nosucharch' model, which transformers"),
    ],
    ids=["missing", "not-gguf", "directory", "architecture"],
)
def test_a_bad_file_is_refused_in_one_line_and_leaves_nothing(
    make, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make(tmp_path)
    out = tmp_path / "out" / "model"

    code, _, stderr = _run(capsys, str(src), "--out", str(out))

    assert code == ModelError.exit_code
    assert message in stderr
    assert stderr.startswith("fedlora: error: ") and stderr.count("\n") == 1
    assert not out.exists() and (not out.parent.exists() or leftovers(out) == [])


def test_an_existing_directory_needs_force_and_is_kept_without_it(
    tiny: TinyCheckpoints, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")

    code, _, stderr = _run(capsys, str(tiny.f32), "--out", str(out))

    assert code == ModelError.exit_code
    assert "already exists: pass --force to replace it" in stderr
    assert stderr.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["config.json"]


def test_force_replaces_a_model_directory_but_nothing_else(
    tiny: TinyCheckpoints, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, other = tmp_path / "model", tmp_path / "photos"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "stale.bin").write_text("old")
    other.mkdir()
    (other / "holiday.jpg").write_text("keep me")

    replaced = _run(capsys, str(tiny.f32), "--out", str(model_dir), "--force")
    refused = _run(capsys, str(tiny.f32), "--out", str(other), "--force")

    assert replaced[0] == 0
    assert not (model_dir / "stale.bin").exists() and (model_dir / IMPORT_INFO).is_file()
    assert refused[0] == ModelError.exit_code
    assert "is not a model directory (no config.json)" in refused[2]
    assert [p.name for p in other.iterdir()] == ["holiday.jpg"]
    assert leftovers(model_dir) == [] and leftovers(other) == []


def test_a_failed_conversion_leaves_no_directory_and_keeps_the_old_one(
    tiny: TinyCheckpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(directory: Path, probe: object) -> dict[str, object]:
        raise ModelError("simulated failure after the weights were written")

    monkeypatch.setattr(gguf_import, "_verify", broken)
    fresh, existing = tmp_path / "fresh", tmp_path / "existing"
    existing.mkdir()
    (existing / "config.json").write_text('{"old": true}')

    with pytest.raises(ModelError, match="simulated failure"):
        import_gguf(tiny.f32, fresh, notify=lambda _: None)
    with pytest.raises(ModelError, match="simulated failure"):
        import_gguf(tiny.f32, existing, force=True, notify=lambda _: None)

    assert not fresh.exists()
    assert json.loads((existing / "config.json").read_text()) == {"old": True}
    assert sorted(os.listdir(tmp_path)) == ["existing"]


def test_a_gguf_file_given_as_model_says_how_to_convert_it(tiny: TinyCheckpoints) -> None:
    with pytest.raises(ModelError, match=r"is a GGUF file: convert it once with `fedlora models "):
        load_base_model(tiny.q8_0)
