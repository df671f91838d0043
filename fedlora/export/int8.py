"""Weight-only int8 export: per-output-channel symmetric quantization, pure PyTorch.

Every ``nn.Linear`` of the decoder (attention q/k/v/o and the MLP projections)
is stored as ``<module>.qweight`` (int8, ``[out, in]``) and ``<module>.scale``
(fp32, ``[out]``), with ``weight ≈ qweight * scale[:, None]``:

* ``scale = max|w[row]| / 127``; ``q = clamp(round(w / scale), -127, 127)``.
  The grid is symmetric (−128 is never used) and ``torch.round`` rounds half to
  even, so quantizing the same weights twice gives the same bytes.
* Everything else — token embeddings, norms, biases — is kept in ``rest_dtype``
  (fp16 by default; a tensor fp16 cannot hold stays fp32). These are a small
  share of a decoder's weights and the most sensitive to rounding.
* ``lm_head``: when tied to the embeddings it is the embedding matrix, stored
  once and kept. When untied it is kept in ``rest_dtype`` unless
  ``quantize_lm_head=True``; it sets every logit, so it is opt-in and the quality
  gate decides whether the saving is worth it.

:func:`load_int8_model` rebuilds a runnable transformers model from
``config.json`` in which each quantized layer is an :class:`Int8WeightOnlyLinear`
that keeps the int8 weights in memory and scales its output per channel, the
same scheme as torchao's ``Int8WeightOnlyConfig``. (``torch.ao`` dynamic
quantization is deprecated and also quantizes activations, so it is not used.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fedlora.errors import ExportError, ModelError
from fedlora.export.merge import dtype_kwargs, load_fp32_model

QMAX = 127
SCHEME = "int8-weight-only-per-channel"
CONFIG_FORMAT = "fedlora.export.int8"
CONFIG_VERSION = 1
QUANT_CONFIG = "quant_config.json"
WEIGHTS_FILE = "model.safetensors"


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of a 2-D weight, one scale per output row.

    Returns ``(qweight int8 [out, in], scale fp32 [out])``. Each element's
    dequantization error is at most ``scale[row] / 2`` (plus fp32 rounding). An
    all-zero row gets the smallest positive scale and quantizes to zeros.
    """
    if weight.dim() != 2:
        raise ExportError(
            f"int8 quantization expects a 2-D weight, got shape {tuple(weight.shape)}"
        )
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise ExportError(
            "weight has NaN or infinite values: the merged model is corrupt, re-export it"
        )
    amax = w.abs().amax(dim=1)
    scale = (amax / QMAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_per_channel(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weight an int8 layer computes with: ``qweight * scale[:, None]``."""
    return qweight.to(torch.float32) * scale.to(torch.float32)[:, None]


class Int8WeightOnlyLinear(nn.Module):
    """``nn.Linear`` with an int8 weight and an fp32 per-output-channel scale.

    ``forward(x) = (x @ qweight.T) * scale + bias``, computed in ``x``'s dtype;
    the int8 weight is cast per call, so only int8 bytes stay resident.
    """

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_per_channel(self.qweight, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def _tied_lm_head(model: Any) -> bool:
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is None or in_emb is None:
        return False
    return bool(out_emb.weight.data_ptr() == in_emb.weight.data_ptr())


def _linear_targets(model: Any, quantize_lm_head: bool) -> list[str]:
    lm_head = model.get_output_embeddings()
    skip_head = not quantize_lm_head or _tied_lm_head(model)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not (module is lm_head and skip_head)
    ]


def _stored(tensor: torch.Tensor, rest_dtype: torch.dtype) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor.contiguous()
    cast = tensor.detach().to(rest_dtype)
    return (cast if torch.isfinite(cast).all() else tensor.detach().float()).contiguous()


def quantize_int8(
    merged_dir: str | Path,
    out_dir: str | Path,
    *,
    quantize_lm_head: bool = False,
    rest_dtype: torch.dtype = torch.float16,
) -> Path:
    """Write the int8 artefact of the merged fp32 checkpoint in ``merged_dir`` to ``out_dir``.

    ``out_dir`` gets ``model.safetensors``, ``quant_config.json`` and copies of the
    merged config, generation config and tokenizer files. Returns ``out_dir``.
    """
    src, out = Path(merged_dir), Path(out_dir)
    model = load_fp32_model(src)
    targets = _linear_targets(model, quantize_lm_head)
    state = model.state_dict()
    aliases: dict[str, str] = {}
    if _tied_lm_head(model):
        head_key = _param_key(model, model.get_output_embeddings())
        aliases[head_key] = _param_key(model, model.get_input_embeddings())
        del state[head_key]

    tensors: dict[str, torch.Tensor] = {}
    for name in targets:
        qweight, scale = quantize_per_channel(state.pop(f"{name}.weight"))
        tensors[f"{name}.qweight"], tensors[f"{name}.scale"] = qweight.contiguous(), scale
    for key, tensor in state.items():
        tensors[key] = _stored(tensor, rest_dtype)

    out.mkdir(parents=True, exist_ok=True)
    # One metadata key only: safetensors writes a multi-key map in random order.
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    lm_head = "tied" if aliases else ("quantized" if quantize_lm_head else "kept")
    config = {
        "format": CONFIG_FORMAT,
        "version": CONFIG_VERSION,
        "scheme": SCHEME,
        "weights_file": WEIGHTS_FILE,
        "bits": 8,
        "symmetric": True,
        "granularity": "per-output-channel",
        "axis": 0,
        "group_size": None,
        "qmin": -QMAX,
        "qmax": QMAX,
        "rounding": "half-to-even",
        "scale_dtype": "float32",
        "unquantized_dtype": str(rest_dtype).removeprefix("torch."),
        "lm_head": lm_head,
        "aliases": aliases,
        "quantized_modules": targets,
    }
    (out / QUANT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copyfile(path, out / path.name)
    return out


def _param_key(model: Any, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return f"{name}.weight"
    raise ExportError("embedding module not found in the model: unsupported architecture")


def _read_quant_config(path: Path) -> dict[str, Any]:
    file = path / QUANT_CONFIG
    if not file.is_file():
        raise ModelError(f"no int8 artefact in {path} (no {QUANT_CONFIG}): export it first")
    config = json.loads(file.read_text(encoding="utf-8"))
    if config.get("format") != CONFIG_FORMAT or config.get("version") != CONFIG_VERSION:
        raise ModelError(
            f"{file} is not a version-{CONFIG_VERSION} {CONFIG_FORMAT} file: "
            "re-export with this version of fedlora"
        )
    if config.get("scheme") != SCHEME:
        raise ModelError(f"{file} uses scheme {config.get('scheme')!r}; only {SCHEME} is supported")
    return config


def load_int8_model(int8_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Any:
    """Rebuild the runnable int8 model saved by :func:`quantize_int8`, in eval mode.

    Quantized layers become :class:`Int8WeightOnlyLinear`; every other tensor is
    loaded into a model built from the artefact's ``config.json`` in ``dtype``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(int8_dir)
    qconfig = _read_quant_config(path)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(str(path.resolve()), local_files_only=True),
        **dtype_kwargs(dtype),
    )
    for name in qconfig["quantized_modules"]:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ModelError(
                f"{path}: {name} is not a linear layer of this architecture: re-export"
            )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = Int8WeightOnlyLinear(linear.in_features, linear.out_features, linear.bias is not None)
        setattr(parent, child, q)

    try:
        tensors = load_file(str(path / qconfig["weights_file"]))
        result = model.load_state_dict(tensors, strict=False)
    except (OSError, RuntimeError, SafetensorError) as err:
        raise ModelError(
            f"int8 weights in {path} are unreadable or do not fit its config.json: re-export"
        ) from err
    missing = set(result.missing_keys) - set(qconfig["aliases"])
    if missing or result.unexpected_keys:
        example = sorted(missing or result.unexpected_keys)[0]
        raise ModelError(
            f"int8 weights in {path} do not fit its config.json "
            f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected, e.g. {example}): "
            "re-export"
        )
    for alias, canonical in qconfig["aliases"].items():
        if model.get_parameter(alias) is not model.get_parameter(canonical):
            raise ModelError(f"{path}: {alias} should be tied to {canonical} but is not: re-export")
    return model.to(dtype).eval()
