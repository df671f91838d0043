"""The LoRA adapter: attach it, move it as numpy arrays, save it in PEFT format.

The adapter is the only thing a device trains and sends. Its tensors travel
as a list of float32 arrays in the fixed order of :func:`adapter_names`, the
order in which the model registers its parameters (identical for every
process that builds the same base model with the same settings).
:func:`set_adapter_arrays` checks a whole update before it writes any of it,
so a malformed update leaves the model untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora.config import LoraSettings as LoraSettings  # re-exported: the adapter's settings
from fedlora.errors import ModelError, UpdateError

ADAPTER_METADATA = "fedlora_adapter.json"


def attach_lora(model: Any, settings: LoraSettings, *, seed: int | None = None) -> Any:
    """Wrap ``model`` (changed in place) in a PEFT LoRA model; only LoRA tensors train.

    ``seed`` makes the random ``lora_A`` initialisation reproducible without
    touching the global torch RNG; ``lora_B`` starts at zero, so the wrapped
    model first computes exactly what the base does.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = [t for t in settings.target_modules if not any(_matches(n, t) for n in linear)]
    if missing:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ModelError(
            f"LoRA target module(s) {', '.join(missing)} not in the model; "
            f"its linear layers are: {', '.join(kinds)}"
        )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type=TaskType.CAUSAL_LM,
        bias="none",
    )
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        param.requires_grad_(_is_lora(name))
    return peft_model


def _matches(module_name: str, target: str) -> bool:
    """PEFT's rule: a target names a module exactly or by a dotted suffix."""
    return module_name == target or module_name.endswith("." + target)


def _is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_names(peft_model: Any) -> list[str]:
    """Names of the LoRA tensors, in the model's registration order."""
    names = [name for name, _ in peft_model.named_parameters() if _is_lora(name)]
    if not names:
        raise ModelError("the model has no LoRA tensors; call attach_lora() first")
    return names


def _lora_params(peft_model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    params = [(n, p) for n, p in peft_model.named_parameters() if _is_lora(n)]
    if not params:
        raise ModelError("the model has no LoRA tensors; call attach_lora() first")
    return params


def get_adapter_arrays(peft_model: Any) -> list[np.ndarray]:
    """float32 copies of the LoRA tensors, in :func:`adapter_names` order."""
    return [p.detach().to("cpu", torch.float32).numpy().copy() for _, p in _lora_params(peft_model)]


def set_adapter_arrays(peft_model: Any, arrays: Sequence[np.ndarray]) -> None:
    """Write an update into the LoRA tensors, after checking all of it."""
    params = _lora_params(peft_model)
    if len(arrays) != len(params):
        raise UpdateError(
            f"the update has {len(arrays)} arrays but the adapter has {len(params)} tensors; "
            "it was made for different LoRA settings or another base model"
        )
    for (name, param), array in zip(params, arrays, strict=True):
        if not isinstance(array, np.ndarray):
            raise UpdateError(f"update for {name} is a {type(array).__name__}, not a numpy array")
        if array.dtype != np.float32:
            raise UpdateError(f"update for {name} is {array.dtype}, expected float32; cast it")
        if tuple(array.shape) != tuple(param.shape):
            raise UpdateError(
                f"update for {name} has shape {tuple(array.shape)}, expected {tuple(param.shape)}"
            )
        if not np.isfinite(array).all():
            raise UpdateError(f"update for {name} has NaN or infinite values; it is rejected")
    with torch.no_grad():
        for (_, param), array in zip(params, arrays, strict=True):
            param.copy_(torch.from_numpy(np.ascontiguousarray(array)))


def save_adapter(
    peft_model: Any, out_dir: str | Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Save the adapter in PEFT format (plus ``fedlora_adapter.json``), atomically.

    The directory is written beside ``out_dir`` and renamed into place; an
    existing ``out_dir`` is replaced. ``metadata`` must be JSON-serialisable.
    """
    out = Path(out_dir)
    try:
        meta_text = json.dumps(metadata or {}, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ModelError(f"adapter metadata is not JSON-serialisable: {err}") from None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:
        raise ModelError(f"cannot write the adapter to {out}: {err.strerror}") from None
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    moved_aside = False
    try:
        # save_embedding_layers=False: never look the base model up on the Hub.
        peft_model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        (tmp / ADAPTER_METADATA).write_text(meta_text + "\n", encoding="utf-8")
        tmp.chmod(0o755)
        if out.exists():
            os.replace(out, old)
            moved_aside = True
        os.replace(tmp, out)
    except OSError as err:
        if moved_aside and not out.exists():
            os.replace(old, out)  # put the previous adapter back
        raise ModelError(f"cannot write the adapter to {out}: {err.strerror}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if moved_aside:
        shutil.rmtree(old, ignore_errors=True)
    return out


def read_adapter_metadata(adapter_dir: str | Path) -> dict[str, Any]:
    """The ``metadata`` given to :func:`save_adapter` (empty when there was none)."""
    path = Path(adapter_dir) / ADAPTER_METADATA
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return data
