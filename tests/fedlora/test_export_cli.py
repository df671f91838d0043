"""``fedlora export RUN_DIR``: profiles, format/quant choices, bad input, a real re-export."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from fedlora.cli.export import add_export_parser, cmd_export, resolve_cli_formats
from fedlora.config import FedloraConfig
from fedlora.errors import ConfigError, ExportError, ModelError
from fedlora.export.profiles import PROFILES, format_name, profile_formats
from tests.fedlora.test_export_gguf_support import TinyGguf, tiny_gguf
from tests.fedlora.test_export_support import single_thread  # noqa: F401  (autouse fixture)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedlora")
    add_export_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["export", *argv])


def _run_dir(root: Path, tiny: TinyGguf, *, adapter: bool = True) -> Path:
    """A finished run's directory as the simulation leaves it (config.json + adapter/)."""
    run = root / "run"
    run.mkdir()
    config = FedloraConfig().replace(model={"path": str(tiny.base)}).to_dict()
    config |= {"resolved": {"model_path": str(tiny.base)}, "versions": {"fedlora": "test"}}
    (run / "config.json").write_text(json.dumps(config))
    if adapter:
        shutil.copytree(tiny.adapter, run / "adapter")
    return run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyGguf:
    return tiny_gguf(tmp_path_factory)


def test_profiles_map_each_device_class_to_one_registered_format() -> None:
    from fedlora.export import available_formats

    assert {p: profile_formats(p) for p in PROFILES} == {
        "phone-low": ("gguf-q4_k_m",),
        "phone-high": ("gguf-q8_0",),
        "laptop": ("gguf-f16",),
    }
    assert set(sum(map(profile_formats, PROFILES), ())) <= set(available_formats())
    assert format_name("safetensors", "int8") == "int8"
    assert format_name("safetensors", "fp32") is None  # the merged model alone
    assert format_name("gguf") == "gguf-q8_0"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], None),  # the run's configured formats
        (["--profile", "phone-low", "--profile", "phone-high"], ("gguf-q4_k_m", "gguf-q8_0")),
        (["--quant", "q8_0", "--quant", "int8"], ("gguf-q8_0", "int8")),  # quant names its format
        (["--format", "gguf", "--quant", "q4_k_m", "--quant", "f16"], ("gguf-q4_k_m", "gguf-f16")),
        (["--format", "gguf"], ("gguf-q8_0",)),
        (["--profile", "phone-high", "--quant", "q8_0", "--quant", "int8"], ("gguf-q8_0", "int8")),
        (["--format", "safetensors", "--quant", "fp32"], ()),  # the merged model alone
    ],
)
def test_repeated_profiles_and_quants_add_up(argv: list[str], expected) -> None:
    assert resolve_cli_formats(_args("run", *argv)) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--format", "gguf", "--quant", "q3_x"], "unknown quantization 'q3_x' for gguf"),
        (["--format", "executorch"], "ExecuTorch export is not implemented"),
        (["--profile", "watch"], "unknown profile 'watch'"),
        (["--format", "gguf", "--quant", "int8"], "unknown quantization 'int8' for gguf"),
        (["--quant", "q3_x"], "unknown quantization 'q3_x': choose from"),
    ],
)
def test_bad_choices_are_one_config_error_line(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        resolve_cli_formats(_args("run", *argv))
    assert "\n" not in str(err.value)


def test_run_dir_without_config_or_adapter_is_refused_and_nothing_written(
    tiny: TinyGguf, tmp_path: Path
) -> None:
    run = _run_dir(tmp_path, tiny, adapter=False)

    with pytest.raises(ExportError, match=r"no adapter in .*run/adapter"):
        cmd_export(_args(str(run), "--profile", "phone-high"))
    with pytest.raises(ConfigError, match="not a fedlora run directory"):
        cmd_export(_args(str(tmp_path / "nowhere")))
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_adapter_for_another_base_is_refused(
    tiny: TinyGguf, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    run = _run_dir(tmp_path, tiny)
    other = tiny_gguf(tmp_path_factory, hidden=128, intermediate=344).base

    with pytest.raises(ModelError, match="does not match base model"):
        cmd_export(_args(str(run), "--format", "gguf", "--model", str(other)))
    assert not (run / "export").exists()


def test_export_writes_the_profile_and_refuses_a_same_shaped_other_base_later(
    tiny: TinyGguf, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_dir(tmp_path, tiny)

    assert cmd_export(_args(str(run), "--profile", "phone-high")) == 0

    manifest = json.loads((run / "export" / "manifest.json").read_text())
    names = [a["name"] for a in manifest["artefacts"]]
    q8 = manifest["artefacts"][1]
    assert names == ["merged-fp32", "gguf-q8_0"]
    assert q8["quality"]["tokens"] > 1000  # the coordinator's held-out set, not a sample
    assert q8["details"]["tensor_types"]["Q8_0"] == 16
    assert "gguf-q8_0:" in capsys.readouterr().out

    # Same shapes, different weights: the merge would succeed, so the fingerprint must refuse.
    impostor = tmp_path / "impostor"
    shutil.copytree(tiny.base, impostor)
    weights = load_file(str(impostor / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(impostor / "model.safetensors"))
    before = (run / "export" / "manifest.json").read_bytes()
    with pytest.raises(ModelError, match=r"not the one the adapter .* was exported with"):
        cmd_export(_args(str(run), "--format", "gguf", "--model", str(impostor)))
    assert (run / "export" / "manifest.json").read_bytes() == before


def test_profiles_exported_one_after_another_are_released_side_by_side(
    tiny: TinyGguf, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_dir(tmp_path, tiny)
    manifest_file = run / "export" / "manifest.json"
    assert cmd_export(_args(str(run), "--profile", "phone-low")) == 0
    first = json.loads(manifest_file.read_text())

    assert cmd_export(_args(str(run), "--profile", "phone-high", "--quant", "int8")) == 0

    second = json.loads(manifest_file.read_text())
    names = [a["name"] for a in second["artefacts"]]
    assert names == ["merged-fp32", "gguf-q4_k_m", "gguf-q8_0", "int8"]
    assert second["artefacts"][:2] == first["artefacts"]  # phone-low kept, entry and files
    out = capsys.readouterr().out
    assert "kept: gguf-q4_k_m" in out and "gguf-q8_0:" in out
    assert "gate: llama.cpp's own Q8_0 (the same file)" in out
    assert "tokenization identical on" in out

    # Again without --replace: refused, nothing touched; with it: only Q8_0 is new.
    before = manifest_file.read_bytes()
    with pytest.raises(ExportError, match="already holds gguf-q8_0: replace it with --replace"):
        cmd_export(_args(str(run), "--profile", "phone-high"))
    assert manifest_file.read_bytes() == before

    assert cmd_export(_args(str(run), "--profile", "phone-high", "--replace")) == 0

    third = json.loads(manifest_file.read_text())
    by_name = {a["name"]: a for a in third["artefacts"]}
    assert by_name["gguf-q8_0"]["path"] == "gguf-q8_0.2"
    assert (
        by_name["gguf-q8_0"]["files"][0]["sha256"] == second["artefacts"][2]["files"][0]["sha256"]
    )
    assert [by_name[n] for n in ("gguf-q4_k_m", "int8")] == [
        second["artefacts"][1],
        second["artefacts"][3],
    ]
    assert not (run / "export" / "gguf-q8_0").exists()


def test_gate_overrides_parse_and_refuse_what_is_not_name_key_value() -> None:
    args = _args("run", "--gate", "int8.max_kl=0.01", "--gate", "merged-fp32.max_kl=inf")
    assert args.gate == [("int8", "max_kl", 0.01), ("merged-fp32", "max_kl", float("inf"))]
    for bad in ("int8=0.1", "int8.max_kl", ".max_kl=1", "int8.max_kl=lots"):
        with pytest.raises(SystemExit):
            _args("run", "--gate", bad)


def test_configured_gates_apply_to_what_an_export_writes_and_the_cli_overrides_them() -> None:
    from fedlora.export.pipeline import check_configured_gates, gates_for

    configured = {"int8": {"max_kl": 0.01, "max_perplexity_increase": 0.02}, "gguf-q8_0": {}}

    gates = gates_for(("int8",), configured, {"int8": {"max_kl": 0.5}, "merged-fp32": {}})

    assert gates == {
        "int8": {"max_kl": 0.5, "max_perplexity_increase": 0.02},
        "merged-fp32": {},
    }
    assert gates_for(("gguf-q4_k_m",), configured) == {}
    check_configured_gates(configured)  # every name an artefact, every key a gate's
    with pytest.raises(ConfigError, match="gate for 'int9', which is not exported"):
        check_configured_gates({"int9": {"max_kl": 1.0}})
    with pytest.raises(ConfigError, match=r"unknown gate key\(s\) \['max_lk'\]"):
        check_configured_gates({"int8": {"max_lk": 1.0}})


def test_export_gates_in_the_config_round_trip_and_refuse_non_numbers() -> None:
    cfg = FedloraConfig.from_dict({"export": {"gates": {"int8": {"max_kl": 1}}}})
    assert cfg.export.gates == {"int8": {"max_kl": 1.0}}
    assert FedloraConfig.from_dict(cfg.to_dict()) == cfg
    assert FedloraConfig().export.gates == {}
    with pytest.raises(ConfigError, match=r"export\.gates must be an object of objects of numbers"):
        FedloraConfig.from_dict({"export": {"gates": {"int8": {"max_kl": "small"}}}})
