"""Merge a LoRA adapter into its base model, in fp32, as a plain safetensors checkpoint.

The merged checkpoint is the reference every other export artefact is measured
against, so it is computed in fp32 whatever dtype the base is stored in.
Everything is loaded from local files only: export never reaches the network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from fedlora.errors import ExportError, ModelError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^]]*\])\) "
    r"from checkpoint, the shape in current model is torch\.Size\((\[[^]]*\])\)"
)


def _one_line(err: BaseException, limit: int = 200) -> str:
    """The useful part of a loader's multi-line error, as one short line."""
    text = str(err)
    mismatch = _SIZE_MISMATCH.search(text)
    if mismatch:
        name, saved, current = mismatch.groups()
        return f"size mismatch: {name} is {saved} in the adapter but {current} in the base"
    lines = text.strip().splitlines()
    first = lines[0] if lines else type(err).__name__
    return first if len(first) <= limit else first[: limit - 1] + "…"


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """Return ``adapter_dir`` as a resolved path, or refuse if it holds no saved adapter.

    Checked here, before peft sees the path: peft treats a missing local path as a
    Hugging Face Hub repo id and retries network requests for a minute.
    """
    path = Path(adapter_dir)
    if not (path / ADAPTER_CONFIG).is_file():
        raise ExportError(
            f"no adapter in {path} (no {ADAPTER_CONFIG}): run federated training first, "
            "or pass the directory the global adapter was saved to"
        )
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise ExportError(
            f"adapter in {path} has no {ADAPTER_WEIGHTS}: save it with "
            "save_pretrained(..., safe_serialization=True); pickled weights are not loaded"
        )
    return path.resolve()


def dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """``{"dtype": dtype}`` for transformers' loaders, or ``torch_dtype`` before 4.56."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def load_fp32_model(model_path: str | Path) -> Any:
    """Load a local causal-LM checkpoint in fp32 and eval mode, or raise :class:`ModelError`."""
    from transformers import AutoModelForCausalLM

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise ModelError(
            f"no model at {path} (no config.json): pass a local model directory "
            "saved with save_pretrained"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.resolve()), local_files_only=True, **dtype_kwargs(torch.float32)
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load model at {path}: {_one_line(err)}") from err
    return model.eval()


def load_peft_model(base_path: str | Path, adapter_dir: str | Path) -> Any:
    """The fp32 base with the saved adapter attached (unmerged), in eval mode.

    Refuses an adapter whose tensors do not all land in the base (different shapes,
    target modules the base lacks, or a different number of layers): peft only warns
    about missing or unexpected keys, which would silently export the bare base.
    """
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    adapter = check_adapter_dir(adapter_dir)
    base = load_fp32_model(base_path)
    mismatch = f"adapter in {adapter} does not match base model {base_path}"
    try:
        model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ModelError(
            f"{mismatch} ({_one_line(err)}): export with the base the adapter was trained on"
        ) from err
    with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as f:
        saved = set(f.keys())
    expected = set(get_peft_model_state_dict(model).keys())
    if saved != expected:
        missing, extra = sorted(expected - saved), sorted(saved - expected)
        detail = f"{len(missing)} tensors missing, {len(extra)} unexpected"
        example = (missing or extra)[0]
        raise ModelError(
            f"{mismatch} ({detail}, e.g. {example}): "
            "export with the base the adapter was trained on"
        )
    return model.eval()


def merge_adapter(base_path: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge the adapter into the base in fp32 and save model + tokenizer to ``out_dir``.

    Returns ``out_dir``. The checkpoint is a standard ``save_pretrained`` directory
    (``config.json``, ``model.safetensors``, tokenizer files) that
    ``AutoModelForCausalLM.from_pretrained`` loads with no peft installed.
    """
    from transformers import AutoTokenizer

    out = Path(out_dir)
    model = load_peft_model(base_path, adapter_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(Path(base_path).resolve()), local_files_only=True
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(
            f"no usable tokenizer in base model {base_path} ({_one_line(err)}): "
            "save the tokenizer next to the base weights"
        ) from err
    merged = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def adapter_summary(adapter_dir: str | Path) -> dict[str, Any]:
    """The parts of ``adapter_config.json`` worth recording next to an export."""
    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    keys = ("peft_type", "r", "lora_alpha", "target_modules", "base_model_name_or_path")
    summary = {k: config.get(k) for k in keys}
    if isinstance(summary["target_modules"], list):
        summary["target_modules"] = sorted(summary["target_modules"])
    return summary
