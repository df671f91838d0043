"""export_run end to end: the manifest, the gate, accumulation, and all-or-nothing replacement."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fedlora.errors import ConfigError, ExportError
from fedlora.export import (
    MERGED,
    ExportFormat,
    QualityGate,
    export_run,
    int8,
    register_format,
    unregister_format,
    verify_export,
)
from fedlora.export.merge import load_fp32_model
from tests.fedlora.test_export_support import (
    Tiny,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_setup,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return tiny_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    export = tmp_path_factory.mktemp("run") / "export"
    manifest = export_run(tiny.base, tiny.adapter, export, tiny.input_ids, tiny.attention_mask)
    return export, manifest


def _run(tiny: Tiny, export: Path, **kwargs) -> dict:
    return export_run(
        tiny.base, tiny.adapter, export, tiny.input_ids, tiny.attention_mask, **kwargs
    )


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_export_writes_merged_and_int8_artefacts_with_their_quality(exported, tiny) -> None:
    export, manifest = exported

    merged, quant = manifest["artefacts"]
    assert manifest["format"] == "fedlora.export.manifest" and manifest["version"] == 1
    assert (merged["name"], merged["path"], merged["quantization"]) == (MERGED, "merged", "none")
    assert (quant["name"], quant["path"], quant["format"]) == ("int8", "int8", "safetensors")
    assert quant["quantization"] == "int8-weight-only-per-group"
    assert merged["quality"]["kl"] < 1e-9 and merged["quality"]["top1_agreement"] == 1.0
    assert 0 < quant["quality"]["kl"] <= 1e-3 and quant["quality"]["top1_agreement"] >= 0.98
    assert quant["quality"]["reference"] == MERGED
    assert quant["quality"]["reference_perplexity"] == pytest.approx(
        merged["quality"]["perplexity"]
    )
    assert quant["total_bytes"] < 0.4 * merged["total_bytes"]
    adapter_sha = hashlib.sha256((tiny.adapter / "adapter_model.safetensors").read_bytes())
    assert manifest["adapter"]["sha256"] == adapter_sha.hexdigest()
    assert manifest["base_model"]["fingerprint"]["files"] == ["config.json", "model.safetensors"]
    assert json.loads((export / "manifest.json").read_text()) == manifest


def test_manifest_lists_every_file_with_its_true_sha256_and_size(exported) -> None:
    export, manifest = exported

    listed = {f["path"]: f for a in manifest["artefacts"] for f in a["files"]}
    on_disk = {p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file()}

    assert set(listed) == on_disk - {"manifest.json"}
    for path, entry in listed.items():
        data = (export / path).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    for artefact in manifest["artefacts"]:
        assert artefact["total_bytes"] == sum(f["bytes"] for f in artefact["files"])
    assert verify_export(export) == manifest
    assert _leftovers(export.parent) == []


def test_verify_export_catches_a_changed_file(exported, tmp_path: Path) -> None:
    import shutil

    export = shutil.copytree(exported[0], tmp_path / "copy")
    (export / "int8" / "quant_config.json").write_text("{}")

    with pytest.raises(ExportError, match="does not match its manifest entry"):
        verify_export(export)


def test_impossibly_tight_gate_fails_with_numbers_and_leaves_nothing(tiny, tmp_path: Path) -> None:
    export = tmp_path / "export"

    with pytest.raises(ExportError) as err:
        _run(tiny, export, gate={"int8": {"max_kl": 1e-12, "min_top1_agreement": 1.0}})

    message = str(err.value)
    assert "int8 artefact failed its quality gate" in message
    assert "KL " in message and "> 1e-12" in message and "held-out tokens" in message
    assert "\n" not in message
    assert not export.exists()
    assert _leftovers(tmp_path) == []


def _snapshot(export: Path) -> dict[str, bytes]:
    return {
        p.relative_to(export).as_posix(): p.read_bytes() for p in export.rglob("*") if p.is_file()
    }


def test_failed_export_leaves_the_previous_export_byte_identical(tiny, tmp_path: Path) -> None:
    export = tmp_path / "export"
    _run(tiny, export)
    before = _snapshot(export)

    with pytest.raises(ExportError, match="quality gate"):
        _run(tiny, export, replace=True, gate={"int8": {"max_kl": 0.0}})

    assert _snapshot(export) == before  # the manifest and every file, byte for byte
    assert _leftovers(tmp_path) == []


def test_exporting_an_artefact_again_needs_replace(tiny, tmp_path: Path) -> None:
    export = tmp_path / "export"
    _run(tiny, export)
    before = _snapshot(export)

    with pytest.raises(ExportError, match=r"already holds int8: replace it with --replace"):
        _run(tiny, export)

    assert _snapshot(export) == before
    assert _leftovers(tmp_path) == []


def test_replace_swaps_one_artefact_and_keeps_the_rest(tiny, tmp_path, fp16_format) -> None:
    export = tmp_path / "export"
    first = _run(tiny, export, formats=("int8", "fp16"))
    (export / "int8" / "stale.txt").write_text("from an older export")

    second = _run(tiny, export, formats=("int8",), replace=True)

    merged, int8_entry, fp16 = second["artefacts"]
    assert [a["name"] for a in second["artefacts"]] == [MERGED, "int8", "fp16"]
    assert (merged, fp16) == (first["artefacts"][0], first["artefacts"][2])  # kept as they were
    assert int8_entry["path"] == "int8.2"  # new files at a path the old manifest never named
    assert int8_entry["exported_at"] >= first["artefacts"][1]["exported_at"]
    assert not (export / "int8").exists()  # the replaced artefact's directory is gone
    assert verify_export(export) == second
    assert _leftovers(tmp_path) == []

    third = _run(tiny, export, formats=("int8",), replace=True)

    assert {a["name"]: a["path"] for a in third["artefacts"]}["int8"] == "int8"
    assert not (export / "int8.2").exists()
    assert verify_export(export) == third


def test_a_manifest_never_names_a_missing_file(tiny, tmp_path, monkeypatch) -> None:
    """What the ModelService relies on: at the commit (the manifest's rename) the files of
    both the old and the new manifest are on disk; old ones go only afterwards."""
    from fedlora.export import exportdir

    export = tmp_path / "export"
    _run(tiny, export)
    commits = []
    write = exportdir.write_manifest

    def checked_write(root: Path, manifest: dict) -> Path:
        old = json.loads((root / "manifest.json").read_text())
        for listed in (old, manifest):
            for artefact in listed["artefacts"]:
                for f in artefact["files"]:
                    assert (root / f["path"]).stat().st_size == f["bytes"], f["path"]
        commits.append(manifest)
        return write(root, manifest)

    monkeypatch.setattr(exportdir, "write_manifest", checked_write)

    _run(tiny, export, replace=True)

    assert len(commits) == 1
    assert verify_export(export) == commits[0]


def test_a_directory_left_by_a_killed_export_is_reused(tiny, tmp_path: Path) -> None:
    export = tmp_path / "export"
    _run(tiny, export)
    (export / "int8.2").mkdir()  # moved in, then killed before the manifest was replaced
    (export / "int8.2" / "model.safetensors").write_text("half")

    manifest = _run(tiny, export, replace=True)

    assert {a["name"]: a["path"] for a in manifest["artefacts"]}["int8"] == "int8.2"
    assert verify_export(export) == manifest
    assert sorted(p.name for p in export.iterdir()) == ["int8.2", "manifest.json", "merged"]


def test_artefacts_of_another_adapter_are_not_mixed_in(tiny, tmp_path: Path) -> None:
    from tests.fedlora.test_export_support import save_adapter

    export = tmp_path / "export"
    _run(tiny, export, formats=())
    before = _snapshot(export)
    other = save_adapter(load_fp32_model(tiny.base), tmp_path / "other-adapter", seed=7)

    with pytest.raises(ExportError, match="holds the artefacts of another adapter"):
        export_run(tiny.base, other, export, tiny.input_ids, tiny.attention_mask)

    assert _snapshot(export) == before


def test_one_export_at_a_time(tiny, tmp_path: Path) -> None:
    from fedlora.export.exportdir import export_lock

    export = tmp_path / "export"

    with export_lock(export), pytest.raises(ExportError, match="another export into"):
        _run(tiny, export)

    assert not export.exists()


def test_a_wrong_quantizer_is_caught_by_the_gate(tiny, tmp_path, monkeypatch) -> None:
    # A quantizer that records twice the scale it quantized with: every weight doubles.
    honest = int8.quantize_groups

    def scale_off_by_two(weight, group_size=None):
        qweight, scale = honest(weight, group_size)
        return qweight, scale * 2

    monkeypatch.setattr(int8, "quantize_groups", scale_off_by_two)

    with pytest.raises(ExportError, match=r"int8 artefact failed its quality gate \(KL"):
        _run(tiny, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_missing_adapter_fails_before_any_work(tiny, tmp_path: Path) -> None:
    export = tmp_path / "export"

    with pytest.raises(ExportError, match="no adapter in"):
        export_run(tiny.base, tmp_path / "none", export, tiny.input_ids, tiny.attention_mask)

    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"formats": ("int4",)}, "unknown export format 'int4'"),
        ({"gate": {"gguf": {"max_kl": 1.0}}}, "not exported"),
        ({"gate": {"int8": {"kl": 1.0}}}, "unknown gate key"),
    ],
)
def test_bad_options_are_config_errors(tiny, tmp_path: Path, kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        _run(tiny, tmp_path / "export", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_a_directory_that_is_not_an_export_is_never_replaced(tiny, tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "notes.txt").write_text("mine")

    with pytest.raises(ExportError, match="not a fedlora export"):
        _run(tiny, export)

    assert (export / "notes.txt").read_text() == "mine"


def test_heldout_ids_outside_the_vocabulary_fail_before_merging(tiny, tmp_path: Path) -> None:
    ids = tiny.input_ids.clone()
    ids[0, 0] = 300

    with pytest.raises(ExportError, match=r"token ids must be in \[0, 300\)"):
        export_run(tiny.base, tiny.adapter, tmp_path / "export", ids, tiny.attention_mask)
    assert list(tmp_path.iterdir()) == []


def _write_fp16(merged: Path, out: Path) -> Path:
    import torch

    model = load_fp32_model(merged).to(torch.float16)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture
def fp16_format() -> Iterator[ExportFormat]:
    fmt = ExportFormat(
        name="fp16",
        file_format="safetensors",
        quantization="fp16",
        write=_write_fp16,
        load=lambda path: load_fp32_model(path),
        default_gate=QualityGate(max_kl=1e-4, min_top1_agreement=0.99),
    )
    register_format(fmt)
    yield fmt
    unregister_format(fmt.name)


def test_a_registered_format_is_exported_gated_and_listed(tiny, tmp_path, fp16_format) -> None:
    manifest = _run(tiny, tmp_path / "export", formats=("int8", "fp16"))

    fp16 = manifest["artefacts"][2]
    assert [a["name"] for a in manifest["artefacts"]] == [MERGED, "int8", "fp16"]
    assert fp16["quantization"] == "fp16" and fp16["gate"]["max_kl"] == 1e-4
    assert fp16["gate"]["kind"] == "absolute"
    assert 0 < fp16["quality"]["kl"] < manifest["artefacts"][1]["quality"]["kl"]
    assert (tmp_path / "export" / "fp16" / "model.safetensors").is_file()
    assert verify_export(tmp_path / "export") == manifest


def test_exports_accumulate(tiny, tmp_path, fp16_format) -> None:
    export = tmp_path / "export"
    first = _run(tiny, export)
    merged_bytes = (export / "merged" / "model.safetensors").read_bytes()

    second = _run(tiny, export, formats=("fp16",))

    assert [a["name"] for a in second["artefacts"]] == [MERGED, "int8", "fp16"]
    assert second["artefacts"][:2] == first["artefacts"]  # earlier entries kept verbatim
    assert (export / "merged" / "model.safetensors").read_bytes() == merged_bytes  # reused
    assert second["artefacts"][2]["quality"]["reference_perplexity"] == pytest.approx(
        first["artefacts"][1]["quality"]["reference_perplexity"]
    )
    assert verify_export(export) == second
    assert _run(tiny, export, formats=()) == second  # nothing to add: nothing written
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("name", [MERGED, "merged", "../up", "Int8"])
def test_reserved_or_unsafe_format_names_are_refused(fp16_format, name) -> None:
    with pytest.raises(ConfigError, match="reserved or not a plain directory name"):
        register_format(replace(fp16_format, name=name))


def test_registering_a_name_twice_needs_replace(fp16_format) -> None:
    with pytest.raises(ConfigError, match="already registered"):
        register_format(fp16_format)
    register_format(fp16_format, replace=True)
