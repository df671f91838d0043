"""Weight-only int8 export: symmetric quantization in groups of 32 inputs, pure PyTorch.

Every ``nn.Linear`` of the decoder (attention q/k/v/o and the MLP projections)
is stored as ``<module>.qweight`` (int8, ``[out, in]``) and ``<module>.scale``
(fp16, ``[out, in / group]``): each row is cut into groups of :data:`GROUP_SIZE`
consecutive inputs, and ``weight[r, g*G:(g+1)*G] ≈ qweight[r, g*G:(g+1)*G] * scale[r, g]``.

* ``scale = max|w[group]| / 127``, rounded *up* to fp16 (so no value needs more
  than ±127); ``q = clamp(round(w / scale), -127, 127)``. The grid is symmetric
  (−128 is never used) and ``torch.round`` rounds half to even, so quantizing the
  same weights twice gives the same bytes. Each element's error is at most half
  its group's step.
* Why groups and not one scale per row: measured on SmolLM2-135M-Instruct (whose
  weights come from a Q4_1 file, 32-wide blocks with their own scale and offset),
  512 tokens of other text, against the fp32 model: per-row int8 moves perplexity
  29.40 → 29.76 (+1.2 %, KL 3.0e-3, top-1 0.947); groups of 32 give 29.40
  (+0.01 %, KL 1.2e-3). A row whose length is not a multiple of 32 keeps one
  scale for the row (``group_size`` per module in ``quant_config.json``).
  Size: 1.0625 bytes a weight, as llama.cpp's Q8_0.
* Everything else — token embeddings, norms, biases — is kept in ``rest_dtype``
  (fp16 by default; a tensor fp16 cannot hold stays fp32). These are a small
  share of a decoder's weights and the most sensitive to rounding.
* ``lm_head``: when tied to the embeddings it is the embedding matrix, stored
  once and kept. When untied it is kept in ``rest_dtype`` unless
  ``quantize_lm_head=True``; it sets every logit, so it is opt-in and the quality
  gate decides whether the saving is worth it.

:func:`load_int8_model` rebuilds a runnable transformers model from
``config.json`` in which each quantized layer is an :class:`Int8WeightOnlyLinear`
that keeps the int8 weights in memory and dequantizes them per call. It also
loads version-1 artefacts (one fp32 scale per row).
(``torch.ao`` dynamic quantization is deprecated and also quantizes activations,
so it is not used.)
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
GROUP_SIZE = 32
SCHEME = "int8-weight-only-per-group"
CONFIG_FORMAT = "fedlora.export.int8"
CONFIG_VERSION = 2
_READABLE = {1: "int8-weight-only-per-channel", 2: SCHEME}
QUANT_CONFIG = "quant_config.json"
WEIGHTS_FILE = "model.safetensors"


def group_size_for(in_features: int, group_size: int = GROUP_SIZE) -> int:
    """The group a row of ``in_features`` inputs is cut into: ``group_size`` if it divides
    the row, else the whole row (one scale per output channel)."""
    return group_size if in_features % group_size == 0 else in_features


def quantize_groups(
    weight: torch.Tensor, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of a 2-D weight, one scale per ``group_size`` inputs of a row.

    ``group_size`` must divide the row length; ``None`` means the whole row. Returns
    ``(qweight int8 [out, in], scale fp16 [out, in / group_size])``. Each element's
    dequantization error is at most half its group's scale (plus fp32 rounding): the
    scale is rounded up to fp16, never down. An all-zero group gets the smallest
    positive fp16 scale and quantizes to zeros.
    """
    if weight.dim() != 2:
        raise ExportError(
            f"int8 quantization expects a 2-D weight, got shape {tuple(weight.shape)}"
        )
    rows, cols = weight.shape
    group = cols if group_size is None else group_size
    if group < 1 or cols % group:
        raise ExportError(f"int8 group size {group} does not divide the row length {cols}")
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise ExportError(
            "weight has NaN or infinite values: the merged model is corrupt, re-export it"
        )
    groups = w.reshape(rows, cols // group, group)
    exact = groups.abs().amax(dim=2) / QMAX
    scale = exact.clamp(min=2.0**-24).to(torch.float16)  # 2**-24: fp16's smallest subnormal
    low = scale.to(torch.float32) < exact
    scale = torch.where(low, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale)
    q = torch.round(groups / scale.to(torch.float32)[..., None]).clamp(-QMAX, QMAX)
    return q.to(torch.int8).reshape(rows, cols), scale


def dequantize_groups(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weight an int8 layer computes with (``scale`` is ``[out]`` or ``[out, groups]``)."""
    rows, cols = qweight.shape
    scale = scale.to(torch.float32).reshape(rows, -1)
    groups = qweight.to(torch.float32).reshape(rows, scale.shape[1], -1)
    return (groups * scale[..., None]).reshape(rows, cols)


class Int8WeightOnlyLinear(nn.Module):
    """``nn.Linear`` with an int8 weight and one scale per group of inputs of each row.

    ``forward(x) = x @ dequantize(qweight, scale).T + bias``, in ``x``'s dtype; the
    weight is dequantized per call, so only int8 bytes stay resident.
    """

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        group_size: int | None = None,
        scale_dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size or in_features
        if in_features % self.group_size:
            raise ModelError(f"int8 group size {group_size} does not divide {in_features} inputs")
        groups = in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=scale_dtype))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_groups(self.qweight, self.scale)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int8 in groups of {self.group_size}"
        )


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
    group_sizes: dict[str, int] = {}
    for name in targets:
        weight = state.pop(f"{name}.weight")
        group_sizes[name] = group_size_for(weight.shape[1])
        qweight, scale = quantize_groups(weight, group_sizes[name])
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
        "granularity": "per-group",
        "axis": 1,
        "group_size": GROUP_SIZE,
        "group_sizes": group_sizes,
        "qmin": -QMAX,
        "qmax": QMAX,
        "rounding": "half-to-even",
        "scale_dtype": "float16",
        "scale_rounding": "up",
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
    version = config.get("version")
    if config.get("format") != CONFIG_FORMAT or version not in _READABLE:
        raise ModelError(
            f"{file} is not a {CONFIG_FORMAT} file of version {sorted(_READABLE)}: "
            "re-export with this version of fedlora"
        )
    if config.get("scheme") != _READABLE[version]:
        raise ModelError(
            f"{file} uses scheme {config.get('scheme')!r}; version {version} is "
            f"{_READABLE[version]}"
        )
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
        q = Int8WeightOnlyLinear(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            group_size=qconfig.get("group_sizes", {}).get(name),  # version 1: whole rows
            scale_dtype=torch.float16 if qconfig["version"] >= 2 else torch.float32,
        )
        setattr(parent, child, q)

    try:
        tensors = load_file(str(path / qconfig["weights_file"]))
        if qconfig["version"] == 1:  # one fp32 scale per row, stored as [out]
            for name in qconfig["quantized_modules"]:
                key = f"{name}.scale"
                if key in tensors:
                    tensors[key] = tensors[key].reshape(-1, 1)
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
