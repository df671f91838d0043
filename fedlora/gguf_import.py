"""A GGUF checkpoint made into a Hugging Face checkpoint directory (``fedlora models import-gguf``).

transformers' own GGUF loader reads the file (``from_pretrained(dir, gguf_file=...)``)
and dequantizes every tensor into a float32 ``*ForCausalLM``, with the tokenizer
and chat template the file carries. The GGUF quantizer it leaves attached to the
model and its config is detached (``save_pretrained`` refuses while it is there:
the weights in memory are plain float32 by then), and the directory is written
with safetensors weights, config, tokenizer and ``fedlora-import.json``: where
the weights came from (path, sha256, size, tensor types) and that they were
dequantized to float32.

The directory is built beside ``out`` and renamed into place only after it was
loaded back with :func:`fedlora.model.load_base_model` and gave the same logits,
so a failure never leaves a directory that looks like a model. Nothing here
reaches the network.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlora.errors import ModelError

IMPORT_INFO = "fedlora-import.json"
IMPORT_FORMAT = "fedlora.gguf-import"
IMPORT_VERSION = 1
GGUF_MAGIC = b"GGUF"
#: Tensor types stored as plain floats: loading them is a cast, not a dequantization.
FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})
_PROBE = "The capital of France is Paris. Ça coûte 5 €."

Notify = Callable[[str], None]


def say(message: str) -> None:
    """fedlora's progress line on stderr (the default ``notify``)."""
    print(f"fedlora: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class GgufSummary:
    """What a GGUF file's header says: architecture, name, file type and tensor types."""

    architecture: str
    name: str | None
    file_type: str | None
    tensor_types: dict[str, int]
    chat_template: bool

    @property
    def quantized_types(self) -> list[str]:
        return sorted(t for t in self.tensor_types if t not in FLOAT_TYPES)


def read_gguf_summary(file: Path) -> GgufSummary:
    """The header of ``file`` (memory-mapped: no tensor is read), or a one-line refusal."""
    check_gguf_file(file)
    try:
        from gguf import GGUFReader, LlamaFileType
    except ImportError:
        raise ModelError("reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(str(file))
    except Exception as err:  # gguf raises ValueError, struct.error, IndexError, ...
        raise ModelError(f"{file} is not a readable GGUF file: {_first_line(err)}") from None

    def field(key: str) -> Any:
        f = reader.get_field(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelError(f"{file} names no general.architecture: not a model GGUF")
    ftype = field("general.file_type")
    try:
        ftype_name = None if ftype is None else LlamaFileType(int(ftype)).name
    except ValueError:
        ftype_name = str(ftype)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return GgufSummary(
        architecture=arch,
        name=field("general.name"),
        file_type=ftype_name,
        tensor_types=dict(sorted(types.items())),
        chat_template=field("tokenizer.chat_template") is not None,
    )


def check_gguf_file(file: Path) -> None:
    """Refuse a path that is missing, not a file, or does not start with GGUF's magic."""
    if not file.exists():
        raise ModelError(f"GGUF file {file} does not exist")
    if not file.is_file():
        raise ModelError(f"{file} is not a file; pass a .gguf file (a model directory is --model)")
    with file.open("rb") as handle:
        head = handle.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise ModelError(
            f"{file} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r}); a Hugging "
            "Face checkpoint directory needs no import: pass it as --model DIR"
        )


def loadable_architectures() -> list[str]:
    """The GGUF architectures this transformers can load (its legacy and its new loader)."""
    names: set[str] = set()
    with contextlib.suppress(ImportError):
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    with contextlib.suppress(ImportError):
        from transformers.integrations.gguf import GGUF_ARCHS

        names.update(GGUF_ARCHS)
    return sorted(names)


def _check_architecture(file: Path, summary: GgufSummary) -> None:
    import transformers

    known = loadable_architectures()
    if known and summary.architecture not in known:
        raise ModelError(
            f"{file} holds a {summary.architecture!r} model, which transformers "
            f"{transformers.__version__} cannot load from GGUF (it loads {', '.join(known)})"
        )


# ------------------------------------------------------------------ the import


def import_gguf(
    file: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    origin: dict[str, Any] | None = None,
    notify: Notify = say,
) -> dict[str, Any]:
    """Convert ``file`` into the Hugging Face checkpoint directory ``out``; returns the
    record written to ``out/fedlora-import.json``.

    ``force`` replaces an existing model directory at ``out`` (never another kind of
    directory); ``origin`` is added to the record's ``source`` (the catalog says which
    entry and package the file came from).
    """
    started = time.perf_counter()
    file, out = Path(file).absolute(), Path(out).absolute()
    summary = read_gguf_summary(file)  # missing / not GGUF: refused before anything else
    _check_out(out, force)
    _check_architecture(file, summary)
    from fedlora.export.manifest import sha256_file

    size = file.stat().st_size
    source = {
        "file": str(file),
        "sha256": sha256_file(file),
        "bytes": size,
        **summary_dict(summary),
        **(origin or {}),
    }
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:
        raise ModelError(f"cannot write beside {out}: {err.strerror or err}") from None
    try:
        notify(
            f"dequantizing {file.name} ({size / 1e6:.0f} MB, {summary.architecture}, "
            f"{summary.file_type}) to float32 with transformers"
        )
        model, tokenizer = _load_dequantized(file)
        record = _save(model, tokenizer, tmp)
        del model
        record["verified"] = _verify(tmp, record.pop("_probe"))
        record = {
            "format": IMPORT_FORMAT,
            "version": IMPORT_VERSION,
            "source": source,
            "dequantized": {
                "from": summary.quantized_types or sorted(summary.tensor_types),
                "to": "float32",
                "tensor_types": summary.tensor_types,
            },
            **record,
            "versions": _versions(),
            "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / IMPORT_INFO).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        for written in tmp.iterdir():  # mkdtemp and safetensors make them private; a model
            written.chmod(0o644)  # directory is shared like the cache
        tmp.chmod(0o755)
        _replace_dir(tmp, out)
    except OSError as err:
        raise ModelError(f"cannot write {out}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def summary_dict(summary: GgufSummary) -> dict[str, Any]:
    return {
        "architecture": summary.architecture,
        "name": summary.name,
        "file_type": summary.file_type,
        "tensor_types": summary.tensor_types,
    }


def _check_out(out: Path, force: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise ModelError(f"{out} exists and is not a directory: pick another --out")
    if not any(out.iterdir()):
        return
    if not force:
        raise ModelError(f"{out} already exists: pass --force to replace it, or pick another --out")
    if not ((out / IMPORT_INFO).is_file() or (out / "config.json").is_file()):
        raise ModelError(
            f"{out} is not a model directory (no config.json): --force replaces only a model "
            "directory; pick another --out"
        )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warning that it dequantizes the whole model is what we asked for."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _load_dequantized(file: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    with contextlib.suppress(ImportError):  # transformers >= 5: keep nothing packed
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    where, name = str(file.parent), file.name
    with _quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
        except Exception as err:  # tokenizer converters raise anything from KeyError up
            raise ModelError(f"cannot read the tokenizer in {file}: {_first_line(err)}") from None
        try:
            model = AutoModelForCausalLM.from_pretrained(
                where, gguf_file=name, dtype=torch.float32, local_files_only=True, **kwargs
            )
        except Exception as err:
            raise ModelError(f"transformers cannot load {file}: {_first_line(err)}") from None
    detach_quantizer(model)
    packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    odd = [n for n, p in model.named_parameters() if p.dtype != torch.float32 or p.is_meta]
    if packed or odd:
        raise ModelError(
            f"transformers left {len(packed) + len(odd)} tensors of {file} packed or not in "
            f"float32 (e.g. {(packed + odd)[0]}): cannot import it as a float checkpoint"
        )
    model.eval()
    return model, tokenizer


def detach_quantizer(model: Any) -> None:
    """Forget the GGUF quantizer transformers attached: the weights are float by now."""
    for attr in ("hf_quantizer", "is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _save(model: Any, tokenizer: Any, out: Path) -> dict[str, Any]:
    from fedlora.model import portable_tokenizer_class

    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    context = getattr(model.config, "max_position_embeddings", None)
    if context and tokenizer.model_max_length > context:  # GGUF tokenizers come unbounded
        tokenizer.model_max_length = context
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    portable_tokenizer_class(out / "tokenizer_config.json")
    return {
        "model": {
            "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": int(model.config.vocab_size),
            "dtype": "float32",
        },
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "tokens": len(tokenizer),
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
        },
        "_probe": _probe_logits(model, tokenizer),
    }


@torch.no_grad()
def _probe_logits(model: Any, tokenizer: Any) -> tuple[list[int], torch.Tensor]:
    ids = tokenizer(_PROBE)["input_ids"]
    return ids, model(input_ids=torch.tensor([ids])).logits[0]


def _verify(directory: Path, probe: tuple[list[int], torch.Tensor]) -> dict[str, Any]:
    """Load ``directory`` as a run would and check it tokenizes and computes the same."""
    from fedlora.model import load_base_model

    ids, logits = probe
    model, tokenizer = load_base_model(directory)
    again = tokenizer(_PROBE)["input_ids"]
    if again != ids:
        raise ModelError("the saved tokenizer encodes differently from the GGUF's: not imported")
    with torch.no_grad():
        diff = float((model(input_ids=torch.tensor([ids])).logits[0] - logits).abs().max())
    if not diff <= 1e-4:
        raise ModelError(
            f"the saved checkpoint computes different logits from the loaded GGUF (max |Δ| "
            f"{diff:.3g}): not imported"
        )
    return {"probe_tokens": len(ids), "reload_max_abs_logit_diff": diff}


def _replace_dir(built: Path, out: Path) -> None:
    """Rename ``built`` to ``out``; an existing ``out`` is moved aside first, then removed."""
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(built, out)
    except OSError:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    try:
        gguf_version = version("gguf")
    except PackageNotFoundError:
        gguf_version = "unknown"
    return {
        "transformers": transformers.__version__,
        "gguf": gguf_version,
        "torch": torch.__version__,
    }


def read_import_info(directory: Path) -> dict[str, Any] | None:
    """``directory/fedlora-import.json``, or None when it is not an imported checkpoint."""
    try:
        info = json.loads((directory / IMPORT_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("format") == IMPORT_FORMAT else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
