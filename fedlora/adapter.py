"""The LoRA adapter: attach it, move it as numpy arrays, save it in PEFT format.

The adapter is the only thing a device trains and sends. Its tensors travel
as a list of float32 arrays in the fixed order of :func:`adapter_names`, the
order in which the model registers its parameters (identical for every
process that builds the same base model with the same settings).
:func:`set_adapter_arrays` checks a whole update before it writes any of it,
so a malformed update leaves the model untouched.

With ``lora.variant: "ffa"`` (FFA-LoRA) every ``lora_A`` is frozen at a value drawn from
the run's seed and its module's name (:func:`ffa_lora_a`), so every process that attaches
the adapter with the same seed holds the same A; only the ``lora_B`` tensors train and
travel (:func:`adapter_names` lists B only), and :func:`save_adapter` still writes A and B
in PEFT format.

Which linear layers get LoRA is the settings' list, or by default the model family's
attention and MLP projections (:func:`default_targets`); the saved adapter records the
list that was used (PEFT's ``adapter_config.json`` and ``fedlora_adapter.json``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora.config import LLAMA_LINEAR_MODULES
from fedlora.config import LoraSettings as LoraSettings  # re-exported: the adapter's settings
from fedlora.errors import ModelError, UpdateError

ADAPTER_METADATA = "fedlora_adapter.json"

_PHI3_LINEAR_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

#: Default LoRA targets by ``config.model_type``: every attention and MLP projection of a
#: decoder block, never the embeddings or ``lm_head``. A family not listed gets
#: :data:`~fedlora.config.LLAMA_LINEAR_MODULES` when it has all of them (the default of
#: every model before this table) and is refused otherwise.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": LLAMA_LINEAR_MODULES,  # SmolLM2, TinyLlama, Llama 3.x
    "mistral": LLAMA_LINEAR_MODULES,
    "qwen2": LLAMA_LINEAR_MODULES,
    "qwen3": LLAMA_LINEAR_MODULES,
    "gemma": LLAMA_LINEAR_MODULES,
    "gemma2": LLAMA_LINEAR_MODULES,
    "gemma3_text": LLAMA_LINEAR_MODULES,  # Gemma3ForCausalLM
    "phi3": _PHI3_LINEAR_MODULES,
}


def attach_lora(model: Any, settings: LoraSettings, *, seed: int | None = None) -> Any:
    """Wrap ``model`` (changed in place) in a PEFT LoRA model; only LoRA tensors train.

    ``seed`` makes the random ``lora_A`` initialisation reproducible without
    touching the global torch RNG; ``lora_B`` starts at zero, so the wrapped
    model first computes exactly what the base does.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    targets = resolve_targets(model, settings)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
        task_type=TaskType.CAUSAL_LM,
        bias="none",
    )
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    if settings.variant == "ffa":
        _freeze_ffa_a(peft_model, 0 if seed is None else seed)
    exchanged = _exchanged_test(settings.variant)
    for name, param in peft_model.named_parameters():
        param.requires_grad_(exchanged(name))
    return peft_model


#: Attribute on a PEFT model that says which LoRA variant was attached (``"ffa"`` only).
_VARIANT_ATTR = "fedlora_lora_variant"


def ffa_lora_a(seed: int, module_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """FFA-LoRA's frozen ``lora_A`` of one module: PEFT's default (Kaiming-uniform,
    bound 1/√in_features) drawn from a generator keyed by the run's seed and the module's
    name, so it depends on nothing else (not the device, not the order of modules)."""
    key = hashlib.blake2b(f"ffa-lora-A\x1f{seed}\x1f{module_name}".encode(), digest_size=8)
    gen = torch.Generator().manual_seed(int.from_bytes(key.digest(), "big") & (2**63 - 1))
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).float()


def _freeze_ffa_a(peft_model: Any, seed: int) -> None:
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if not isinstance(lora_a, torch.nn.ModuleDict):
                continue
            for layer in lora_a.values():
                w: torch.Tensor = layer.weight  # type: ignore[assignment]
                w.copy_(ffa_lora_a(seed, name, tuple(w.shape)).to(w.dtype))
    setattr(peft_model, _VARIANT_ATTR, "ffa")


def lora_variant(peft_model: Any) -> str:
    """``"ffa"`` for a model :func:`attach_lora` gave a frozen ``lora_A``, else ``"lora"``."""
    return "ffa" if getattr(peft_model, _VARIANT_ATTR, None) == "ffa" else "lora"


def _exchanged_test(variant: str) -> Any:
    """Which parameter names are trained and exchanged: A and B, or B only (FFA)."""
    return _is_lora_b if variant == "ffa" else _is_lora


def resolve_targets(model: Any, settings: LoraSettings) -> tuple[str, ...]:
    """The linear layers ``settings`` puts LoRA on in ``model``: its list, or the default.

    Refuses (one line, naming the model's linear layers) a target that matches none.
    """
    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    kinds = sorted({n.rsplit(".", 1)[-1] for n in linear})
    targets = settings.target_modules
    if targets is None:
        model_type = str(getattr(getattr(model, "config", None), "model_type", None))
        targets = default_targets(model_type, kinds)
        if targets is None:
            raise ModelError(
                f"no default LoRA targets for model type {model_type!r}; set "
                f"lora.target_modules to some of its linear layers: {', '.join(kinds)}"
            )
    missing = [t for t in targets if not any(_matches(n, t) for n in linear)]
    if missing:
        raise ModelError(
            f"LoRA target module(s) {', '.join(missing)} not in the model; "
            f"its linear layers are: {', '.join(kinds)}"
        )
    return tuple(targets)


def default_targets(model_type: str, linear_kinds: Sequence[str]) -> tuple[str, ...] | None:
    """The default LoRA targets of a ``model_type`` whose linear layers are ``linear_kinds``
    (last name components), or None when fedlora has no default for it."""
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    if set(LLAMA_LINEAR_MODULES) <= set(linear_kinds):
        return LLAMA_LINEAR_MODULES
    return None


def lora_targets(peft_model: Any) -> list[str]:
    """The target modules of a model's LoRA adapter, in the order its layers come."""
    targets = set(peft_model.peft_config["default"].target_modules)
    names = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]

    def first_layer(target: str) -> tuple[int, str]:
        where = (i for i, n in enumerate(names) if _matches(n, target))
        return next(where, len(names)), target

    return sorted(targets, key=first_layer)


def _matches(module_name: str, target: str) -> bool:
    """PEFT's rule: a target names a module exactly or by a dotted suffix."""
    return module_name == target or module_name.endswith("." + target)


def _is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def _is_lora_b(name: str) -> bool:
    return ".lora_B." in name


def adapter_names(peft_model: Any) -> list[str]:
    """Names of the LoRA tensors that train and travel, in the model's registration order
    (``lora_A`` and ``lora_B``; ``lora_B`` only with FFA)."""
    return [name for name, _ in _lora_params(peft_model)]


def _lora_params(peft_model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    exchanged = _exchanged_test(lora_variant(peft_model))
    params = [(n, p) for n, p in peft_model.named_parameters() if exchanged(n)]
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
    existing ``out_dir`` is replaced. ``metadata`` must be JSON-serialisable; the
    adapter's target modules are added to it (``lora_target_modules``).
    """
    out = Path(out_dir)
    meta = {**(metadata or {}), "lora_target_modules": lora_targets(peft_model)}
    if lora_variant(peft_model) == "ffa":
        meta["lora_variant"] = "ffa"  # lora_A is the seeded, frozen one (saved with B)
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
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
