"""What each model family's HF → GGUF conversion needs: one :class:`ArchSpec` per family.

llama.cpp runs a GGUF with the graph of the file's architecture (``llama``,
``qwen2``, ``gemma2``, ``gemma3``, ``phi3``), and that graph has its own idea of
the weights' layout and of which hyperparameters it reads. A spec says, for the
transformers architectures of one family:

* which llama.cpp architecture runs it, and the hyperparameters it reads beyond
  the common ones (soft-caps, sliding windows, the local RoPE base…);
* how tensors change on the way: q/k rows permuted for the interleaved RoPE of
  llama.cpp's ``llama`` graph (``interleaved_rope``: the only one of these graphs
  that rotates pairs ``2i, 2i+1``; the others rotate halves, as transformers
  does), Gemma's RMSNorm weights, stored as ``w`` for ``x·(1+w)``, written as
  ``1+w`` (``norm_offset``);
* extra tensors the graph reads (Llama-3's ``rope_freqs``);
* what it refuses: any option the llama.cpp graph would run differently from
  transformers, so that a file is either exact or not written.

:mod:`fedlora.export.gguf` is the front door; the conversion check
(:data:`fedlora.export.gguf.CONVERSION`) is what proves each recipe right.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Check = Callable[[Any], "str | None"]
"""``config -> why llama.cpp would run it differently``, or None."""


# ------------------------------------------------------------------ reading the config


def head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def kv_heads(cfg: Any) -> int:
    return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


def rope(cfg: Any, layer_type: str | None = None) -> dict[str, Any]:
    """RoPE parameters (``rope_type``, ``rope_theta``, scaling keys): of the full-attention
    layers, or of ``layer_type``'s.

    transformers 5 keeps them in ``rope_parameters`` (per layer type for Gemma 3);
    earlier releases in ``rope_theta`` / ``rope_scaling`` (and Gemma 3's
    ``rope_local_base_freq``).
    """
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and (layer_type or "full_attention") in params:
        params = params[layer_type or "full_attention"]
    if not isinstance(params, dict) or "rope_theta" not in params:
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        theta = getattr(cfg, "rope_theta", 10000.0)
        if layer_type == "sliding_attention":
            params = {"rope_theta": getattr(cfg, "rope_local_base_freq", theta)}
        params.setdefault("rope_theta", theta)
    out = dict(params)
    out["rope_type"] = out.get("rope_type") or out.get("type") or "default"
    return out


def layer_types(cfg: Any) -> list[str]:
    types = getattr(cfg, "layer_types", None)
    return list(types) if types else ["full_attention"] * cfg.num_hidden_layers


def _activation(cfg: Any) -> str:
    return str(getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu"))


# ------------------------------------------------------------------ extra tensors


def llama3_rope_freqs(cfg: Any) -> dict[str, np.ndarray]:
    """``rope_freqs``: the divisor of each RoPE frequency under ``rope_type: llama3``.

    transformers rescales the inverse frequencies themselves; llama.cpp divides
    each by this tensor's entry. Kept below ``high_freq_factor``'s wavelength,
    divided by ``factor`` beyond ``low_freq_factor``'s, smoothly in between.
    """
    params = rope(cfg)
    if params["rope_type"] != "llama3":
        return {}
    dim = head_dim(cfg)
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_context = float(params["original_max_position_embeddings"])
    freqs = 1.0 / params["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    divisors = []
    for freq in freqs:
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            divisors.append(1.0)
        elif wavelength > old_context / low:
            divisors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": np.asarray(divisors, dtype=np.float32)}


def no_extra_tensors(cfg: Any) -> dict[str, np.ndarray]:
    return {}


# ------------------------------------------------------------------ refusals


def _no_mlp_bias(cfg: Any) -> str | None:
    return "MLP biases (mlp_bias) are not supported" if getattr(cfg, "mlp_bias", False) else None


def _no_sliding_window(cfg: Any) -> str | None:
    """llama.cpp's ``llama``, ``qwen2`` and ``phi3`` graphs attend to the whole context."""
    window = getattr(cfg, "sliding_window", None)
    if cfg.model_type == "llama" or getattr(cfg, "use_sliding_window", True) is False:
        return None  # transformers' Llama and Qwen2 (unless asked) ignore sliding_window
    if window and window < cfg.max_position_embeddings:
        return (
            f"sliding-window attention ({window} of {cfg.max_position_embeddings} positions) "
            "is not supported: llama.cpp runs this architecture with full attention"
        )
    return None


def _tied(cfg: Any) -> str | None:
    if not getattr(cfg, "tie_word_embeddings", True):
        return "untied embeddings are not supported (llama.cpp's gemma graphs reuse token_embd)"
    return None


def _gemma_attention_scale(layers_27b: int) -> Check:
    """llama.cpp scales queries by head_dim^-0.5 (hidden/heads for the 27B models), whatever
    query_pre_attn_scalar says; refuse a model that asks for another scale."""

    def check(cfg: Any) -> str | None:
        expected = (
            cfg.hidden_size // cfg.num_attention_heads
            if cfg.num_hidden_layers == layers_27b
            else head_dim(cfg)
        )
        scalar = getattr(cfg, "query_pre_attn_scalar", expected)
        if scalar != expected:
            return (
                f"query_pre_attn_scalar {scalar} is not supported: llama.cpp scales queries by "
                f"{expected}^-0.5 for this shape"
            )
        return None

    return check


def _gemma3_extras(cfg: Any) -> str | None:
    if getattr(cfg, "attn_logit_softcapping", None):
        return "attention logit soft-capping is not supported by llama.cpp's gemma3 graph"
    local = rope(cfg, "sliding_attention")
    if local["rope_type"] != "default":
        return f"RoPE type {local['rope_type']!r} on the sliding-window layers is not supported"
    return None


def _gemma2_extras(cfg: Any) -> str | None:
    if not getattr(cfg, "attn_logit_softcapping", None):
        return "Gemma 2 without attention soft-capping is not supported"
    if not getattr(cfg, "final_logit_softcapping", None):
        return "Gemma 2 without final logit soft-capping is not supported"
    return None


def _no_partial_rotary(cfg: Any) -> str | None:
    factor = rope(cfg).get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    if factor not in (None, 1.0):
        return f"partial rotary embeddings (partial_rotary_factor {factor}) are not supported"
    return None


# ------------------------------------------------------------------ family hyperparameters


def _no_hparams(writer: Any, cfg: Any) -> None:
    return None


def _sliding_window(writer: Any, cfg: Any) -> None:
    """The window, and which layers use it (without the pattern llama.cpp assumes Gemma's)."""
    writer.add_sliding_window(int(cfg.sliding_window or cfg.max_position_embeddings))
    writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types(cfg)])


def _gemma2_hparams(writer: Any, cfg: Any) -> None:
    writer.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))
    writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    _sliding_window(writer, cfg)


def _gemma3_hparams(writer: Any, cfg: Any) -> None:
    writer.add_rope_freq_base_swa(float(rope(cfg, "sliding_attention")["rope_theta"]))
    _sliding_window(writer, cfg)
    if getattr(cfg, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))


def _phi3_hparams(writer: Any, cfg: Any) -> None:
    original = getattr(cfg, "original_max_position_embeddings", None)
    writer.add_rope_scaling_orig_ctx_len(int(original or cfg.max_position_embeddings))


# ------------------------------------------------------------------ the registry

_ROPE_WHY = {
    rope_type: (
        ": llama.cpp picks the long or short factors by the context it is given, transformers "
        "by each sequence's length, so the file would not run as the model does"
    )
    for rope_type in ("longrope", "su")
}


@dataclass(frozen=True)
class ArchSpec:
    """How one family's checkpoints become a GGUF that llama.cpp runs exactly."""

    family: str
    architectures: tuple[str, ...]
    """transformers ``architectures[0]`` values of this family."""
    gguf_arch: str
    """Name of the ``gguf.MODEL_ARCH`` member (``LLAMA``)."""
    activations: tuple[str, ...]
    rope_types: tuple[str, ...] = ("default",)
    checks: tuple[Check, ...] = ()
    hparams: Callable[[Any, Any], None] = _no_hparams
    """``(writer, config)``: the family's keys beyond the common ones."""
    interleaved_rope: bool = False
    """llama.cpp's graph rotates pairs ``2i, 2i+1``: q/k rows are permuted from rotate-half."""
    norm_offset: float = 0.0
    """Added to every ``*norm.weight`` (Gemma: 1, llama.cpp scales by the stored weight)."""
    extra_tensors: Callable[[Any], dict[str, np.ndarray]] = no_extra_tensors
    """``config -> {gguf tensor name: data}`` the graph reads that the checkpoint lacks."""

    def refusal(self, cfg: Any) -> str | None:
        """Why llama.cpp would run ``cfg`` differently from transformers, or None."""
        act = _activation(cfg)
        if act not in self.activations:
            return f"activation {act!r} is not supported (llama.cpp runs {self.activations[0]})"
        rope_type = rope(cfg)["rope_type"]
        if rope_type not in self.rope_types:
            why = _ROPE_WHY.get(rope_type, "")
            return (
                f"RoPE type {rope_type!r} is not supported{why} "
                f"(this family exports with {', '.join(map(repr, self.rope_types))})"
            )
        for check in self.checks:
            reason = check(cfg)
            if reason:
                return reason
        return None


SPECS: dict[str, ArchSpec] = {
    spec.family: spec
    for spec in (
        ArchSpec(
            family="llama",
            architectures=("LlamaForCausalLM", "MistralForCausalLM"),
            gguf_arch="LLAMA",
            activations=("silu",),
            rope_types=("default", "linear", "llama3"),
            checks=(_no_mlp_bias, _no_sliding_window, _no_partial_rotary),
            interleaved_rope=True,
            extra_tensors=llama3_rope_freqs,
        ),
        ArchSpec(
            family="qwen2",
            architectures=("Qwen2ForCausalLM",),
            gguf_arch="QWEN2",
            activations=("silu",),
            checks=(_no_sliding_window,),
        ),
        ArchSpec(
            family="gemma2",
            architectures=("Gemma2ForCausalLM",),
            gguf_arch="GEMMA2",
            activations=("gelu_pytorch_tanh",),
            checks=(_tied, _gemma2_extras, _gemma_attention_scale(46)),
            hparams=_gemma2_hparams,
            norm_offset=1.0,
        ),
        ArchSpec(
            family="gemma3",
            architectures=("Gemma3ForCausalLM",),
            gguf_arch="GEMMA3",
            activations=("gelu_pytorch_tanh",),
            rope_types=("default", "linear"),
            checks=(_tied, _gemma3_extras, _gemma_attention_scale(62)),
            hparams=_gemma3_hparams,
            norm_offset=1.0,
        ),
        ArchSpec(
            family="phi3",
            architectures=("Phi3ForCausalLM",),
            gguf_arch="PHI3",
            activations=("silu",),
            checks=(_no_sliding_window, _no_partial_rotary),
            hparams=_phi3_hparams,
        ),
    )
}
"""Family → spec. Tests replace entries to prove the conversion check catches a lost step."""


def supported_architectures() -> tuple[str, ...]:
    return tuple(a for spec in SPECS.values() for a in spec.architectures)


def spec_for(architecture: str) -> ArchSpec | None:
    return next((s for s in SPECS.values() if architecture in s.architectures), None)
