"""GGUF export for llama.cpp: an F32 GGUF written here, quantized by llama.cpp itself.

* :func:`write_f32_gguf` converts the merged checkpoint (a ``save_pretrained``
  directory of a family in :mod:`fedlora.export.gguf_arch`: Llama / Mistral,
  Qwen2, Gemma 2, Gemma 3, Phi-3) into an F32 GGUF with the full tokenizer
  (:mod:`fedlora.export.gguf_vocab`). The family's spec says which llama.cpp
  graph runs it, the keys that graph reads, and how tensors change on the way
  (q/k permuted for llama's interleaved RoPE, Gemma's norms written as ``1+w``,
  Llama-3's ``rope_freqs``); a file missing one of those loads and runs but is
  wrong, which the conversion check catches (:data:`CONVERSION`,
  :mod:`fedlora.export.reference`). :func:`check_exportable` refuses, in one
  line and before training, what the spec refuses.
* :func:`quantize_gguf` quantizes it with ``llama_cpp.llama_model_quantize``
  (the ``gguf`` package cannot write K-quants). llama.cpp quantizes a tensor to
  a block type only if its row length is a multiple of the block (32 for Q8_0 /
  Q5_0, 256 for K-quants) and otherwise falls back to another type, so the
  manifest records the tensor types actually in the file (:func:`describe_gguf`).
* :class:`LlamaCppModel` runs a GGUF in llama.cpp behind the transformers call
  signature, so :func:`fedlora.export.quality.compare_logits` measures it.
* :data:`CONVERSION` is the F32 conversion as the quantized formats' gate checks
  it (F32 KV cache, tokenization compared with the model's tokenizer), and
  :func:`reference_gguf` is llama.cpp's own quantization of that checked file,
  the reference a quantized artefact is gated against.

The GGUF formats are registered in :mod:`fedlora.export.formats` as
``gguf-f32``, ``gguf-f16``, ``gguf-q8_0`` and ``gguf-q4_k_m``.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import logging
import os
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from fedlora.errors import ExportError, ModelError
from fedlora.export import gguf_arch, gguf_vocab
from fedlora.export.quality import QualityGate
from fedlora.export.reference import Conversion

F32_FILE = "model-f32.gguf"
# llama.cpp's file types (enum llama_ftype) for the quantizations fedlora exports.
QUANT_FTYPES = {"f16": 1, "q8_0": 7, "q4_k_m": 15}
_FTYPE_NAMES = {0: "F32", 1: "F16", 7: "Q8_0", 15: "Q4_K_M"}
K_QUANT_TYPES = frozenset({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"})
MAX_CONTEXT = 4096
"""Context a GGUF is measured in: the longest held-out sequence a config allows (data.seq_len)."""


def _install_hint(package: str) -> ExportError:
    return ExportError(
        f"GGUF export needs the {package} package: pip install 'fedlora[dev]' "
        f"(or pip install {package})"
    )


# ------------------------------------------------------------------ HF → F32 GGUF


def read_config(model_dir: Path) -> tuple[gguf_arch.ArchSpec, Any]:
    """The family spec and transformers config of a checkpoint llama.cpp runs exactly, or refuse.

    Refusals are one line (:class:`ModelError`) naming what is supported.
    """
    try:
        raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"no readable config.json in {model_dir}: {err}") from None
    arch = (raw.get("architectures") or ["?"])[0]
    spec = gguf_arch.spec_for(arch)
    if spec is None:
        raise ModelError(
            f"GGUF export supports {', '.join(gguf_arch.supported_architectures())}; "
            f"{model_dir} is {arch}: export it as safetensors (int8) instead"
        )
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot read {model_dir / 'config.json'}: {first}") from None
    reason = spec.refusal(cfg)
    if reason:
        raise ModelError(
            f"GGUF export of {arch} ({model_dir}): {reason}; "
            "export it as safetensors (int8) instead"
        )
    return spec, cfg


def check_exportable(model_dir: Path) -> None:
    """Refuse (:class:`ModelError`, one line) a checkpoint this GGUF writer cannot convert.

    The same checks as the conversion makes (architecture and the family's options,
    tokenizer kind and pre-tokenizer), without writing anything: what
    ``fedlora simulate`` runs before training, so an unsupported model is refused
    before it costs a run instead of after.
    """
    read_config(Path(model_dir))
    gguf_vocab.check_tokenizer(Path(model_dir))


def permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection from HF's rotate-half order to ggml's interleaved pairs.

    HF rotates dimension ``i`` with ``i + d/2`` within each head; ggml rotates
    ``2i`` with ``2i + 1``. The same permutation as llama.cpp's ``convert_hf_to_gguf``.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _hf_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"no *.safetensors weights in {model_dir}: save with safetensors")
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[name] = f.get_tensor(name).to(torch.float32).numpy()
    return tensors


def _transform(spec: gguf_arch.ArchSpec, name: str, data: np.ndarray, cfg: Any) -> np.ndarray:
    """A checkpoint tensor as ``spec``'s llama.cpp graph reads it."""
    if spec.interleaved_rope:
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_rotary(data, cfg.num_attention_heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_rotary(data, gguf_arch.kv_heads(cfg))
    if spec.norm_offset and name.endswith("norm.weight"):
        data = data + spec.norm_offset
    return data


def _add_hparams(writer: Any, spec: gguf_arch.ArchSpec, cfg: Any, name: str) -> None:
    """The keys every family's graph reads, then the family's own (:attr:`ArchSpec.hparams`)."""
    import gguf

    head_dim = gguf_arch.head_dim(cfg)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(gguf_arch.kv_heads(cfg))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = gguf_arch.rope(cfg)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":  # positions divided by factor (Gemma 3: global layers)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(getattr(cfg, "rms_norm_eps", 1e-6)))
    writer.add_vocab_size(cfg.vocab_size)
    spec.hparams(writer, cfg)


def write_f32_gguf(merged_dir: str | Path, out_file: str | Path) -> Path:
    """Convert a checkpoint of a supported family (:mod:`fedlora.export.gguf_arch`) to an F32
    GGUF with its tokenizer; returns ``out_file``."""
    import gguf

    src, out = Path(merged_dir), Path(out_file)
    spec, cfg = read_config(src)
    arch = gguf.MODEL_ARCH[spec.gguf_arch]
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    _add_hparams(writer, spec, cfg, src.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    gguf_vocab.add_tokenizer(writer, src, cfg.vocab_size)

    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tensors = _hf_tensors(src)
    if getattr(cfg, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output is absent
    for name, data in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ModelError(f"GGUF export: no llama.cpp {spec.family} tensor for {name} in {src}")
        data = _transform(spec, name, data, cfg)
        writer.add_tensor(target, np.ascontiguousarray(data, dtype=np.float32))
    for target, data in spec.extra_tensors(cfg).items():
        writer.add_tensor(target, np.ascontiguousarray(data, dtype=np.float32))
    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# ------------------------------------------------------------------ llama.cpp glue


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise _install_hint("llama-cpp-python") from None
    log = logging.getLogger("llama-cpp-python")  # llama.cpp's own log goes through it
    if log.level == logging.NOTSET:
        log.setLevel(logging.ERROR)  # the quantizer prints every tensor at INFO otherwise
    return llama_cpp


_repack_lock = threading.Lock()


@contextlib.contextmanager
def without_weight_repacking(llama_cpp: Any) -> Iterator[None]:
    """Models loaded inside keep their weights as the file has them (llama.cpp's
    ``--no-repack``: ``use_extra_bufts`` off), so a quantized file is measured with the
    kernels of its own type on every CPU.

    A llama.cpp built on a CPU with AMX (``-march=native``, as pip builds it) otherwise
    repacks Q8_0 and K-quant weights for its AMX kernels, which crash (SIGSEGV in
    ``ggml_backend_amx_mul_mat``, llama-cpp-python 0.3.36) on the small matrices of the
    test models. llama-cpp-python's ``Llama`` has no argument for it: its default model
    parameters are swapped for the duration of the load.
    """
    module = llama_cpp.llama_cpp
    defaults = module.llama_model_default_params

    def no_repacking() -> Any:
        params = defaults()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    with _repack_lock:
        module.llama_model_default_params = no_repacking
        try:
            yield
        finally:
            module.llama_model_default_params = defaults


def quantize_gguf(f32_file: str | Path, out_file: str | Path, quant: str) -> Path:
    """Quantize an F32 GGUF with llama.cpp's own quantizer (``llama_model_quantize``)."""
    if quant not in QUANT_FTYPES:
        raise ExportError(f"unknown GGUF quantization {quant!r}: choose from {list(QUANT_FTYPES)}")
    llama_cpp = _llama_cpp()
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[quant]
    params.nthread = max(1, min(4, os.cpu_count() or 1))
    with _stderr_captured() as said:
        rc = llama_cpp.llama_model_quantize(
            str(f32_file).encode(), str(out_file).encode(), ctypes.byref(params)
        )
    if rc != 0 or not Path(out_file).is_file():
        why = "".join(f": {line}" for line in said()[-1:])
        raise ExportError(
            f"llama.cpp could not quantize {f32_file} to {quant} (return code {rc}){why}"
        )
    return Path(out_file)


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Callable[[], list[str]]]:
    """Hold back what C code writes to file descriptor 2 while the block runs.

    llama.cpp's quantizer prints one warning per tensor that falls back from a K-quant
    (180 lines for SmolLM2) straight to stderr; the manifest records the same facts
    (``k_quant_fallback``). Some of it comes through llama-cpp-python's log callback,
    which prints to ``sys.stderr``: that is held back too. Yields a function giving the
    captured lines afterwards.
    """
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    python_side = io.StringIO()  # llama-cpp-python's log callback prints to sys.stderr
    with tempfile.TemporaryFile(mode="w+b") as sink, contextlib.redirect_stderr(python_side):
        try:
            os.dup2(sink.fileno(), 2)
            yield lambda: lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace") + python_side.getvalue()
            lines[:] = text.splitlines()


def gguf_file(artefact_dir: Path) -> Path:
    files = sorted(Path(artefact_dir).glob("*.gguf"))
    if len(files) != 1:
        raise ModelError(f"expected one .gguf file in {artefact_dir}, found {len(files)}")
    return files[0]


def describe_gguf(artefact_dir: str | Path) -> dict[str, Any]:
    """The tensor types llama.cpp actually wrote, read back with ``gguf.GGUFReader``."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file(Path(artefact_dir))))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    field = reader.get_field("general.file_type")
    ftype = int(field.contents()) if field is not None else None
    k_quants = sum(1 for t in types.values() if t in K_QUANT_TYPES)
    details: dict[str, Any] = {
        "file_type": _FTYPE_NAMES.get(ftype, ftype) if ftype is not None else None,
        "tensor_types": dict(sorted(Counter(types.values()).items())),
        "tensors": types,
        "k_quant_tensors": k_quants,
        "quantized_tensors": sum(1 for t in types.values() if t not in ("F32", "F16", "BF16")),
    }
    if ftype == QUANT_FTYPES["q4_k_m"]:
        fallback = sorted(
            t.name
            for t in reader.tensors
            if len(t.shape) >= 2 and t.tensor_type.name not in K_QUANT_TYPES
        )
        if fallback:
            details["k_quant_fallback"] = fallback
        if k_quants == 0:
            details["note"] = (
                "no tensor has rows whose length is a multiple of 256, so llama.cpp stored none "
                "as a K-quant and fell back per tensor (see tensor_types): this file is "
                "labelled Q4_K_M but is not a K-quant model"
            )
        elif fallback:
            details["note"] = (
                f"{len(fallback)} weight matrices have rows whose length is not a multiple of "
                "256, so llama.cpp fell back to another type for them (see k_quant_fallback)"
            )
    return details


class LlamaCppModel:
    """A GGUF run by llama.cpp, called like a transformers causal LM for logit comparison.

    ``model(input_ids=[B, T], attention_mask=[B, T]).logits`` is ``[B, T, vocab]``;
    each row's real tokens must be a prefix (right padding). Logits at padding
    positions are zero and meaningless.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        n_ctx: int | None = None,
        threads: int = 1,
        f32_cache: bool = False,
    ) -> None:
        """``n_ctx``: context length, at most :data:`MAX_CONTEXT` by default (llama.cpp's
        default, the model's training context, is 128 K tokens for Llama-3.2: a KV cache of
        GBs and an n_ctx x vocab logits buffer). ``f32_cache``: keep K and V in F32
        (llama.cpp's default is F16), so an F32 file runs with no loss of llama.cpp's own;
        the conversion check uses it."""
        llama_cpp = _llama_cpp()
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"no GGUF file at {self.path}")
        cache = (
            {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
            if f32_cache
            else {}
        )
        with without_weight_repacking(llama_cpp):
            self.llm = llama_cpp.Llama(
                model_path=str(self.path),
                n_ctx=n_ctx or MAX_CONTEXT,
                n_batch=512,
                logits_all=True,
                n_threads=threads,
                # Prompts are evaluated as batches, on n_threads_batch (llama-cpp-python's
                # default: every CPU). On a shared machine its spinning threads make a tiny
                # model 100x slower.
                n_threads_batch=threads,
                verbose=False,
                **cache,
            )
        self.config = SimpleNamespace(vocab_size=self.llm.n_vocab())
        self.training = False

    def eval(self) -> LlamaCppModel:
        return self

    def train(self, mode: bool = True) -> LlamaCppModel:
        return self

    def logits(self, tokens: list[int]) -> np.ndarray:
        """``[len(tokens), vocab]`` logits of one sequence, from a fresh context."""
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        out = torch.zeros(*input_ids.shape, self.config.vocab_size, dtype=torch.float32)
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask, strict=True)):
            n = int(mask.sum())
            if not bool(mask[:n].all()):
                raise ExportError("llama.cpp comparison needs right-padded held-out sequences")
            if n > self.llm.n_ctx():
                raise ExportError(
                    f"a held-out sequence of {n} tokens does not fit llama.cpp's context of "
                    f"{self.llm.n_ctx()}: use shorter held-out sequences (data.seq_len)"
                )
            if n:
                out[row, :n] = torch.from_numpy(self.logits([int(t) for t in ids[:n]]))
        return SimpleNamespace(logits=out)

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False))

    def greedy(self, tokens: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of ``tokens`` (argmax each step), at most ``max_new_tokens``."""
        self.llm.reset()
        out: list[int] = []
        for token in self.llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, reset=True):
            out.append(int(token))
            if len(out) >= max_new_tokens or token == self.llm.token_eos():
                break
        return out


def write_gguf(merged_dir: Path, out_dir: Path, quant: str) -> Path:
    """The ``gguf-<quant>`` artefact: ``out_dir/model-<quant>.gguf``; returns ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if quant == "f32":
        write_f32_gguf(merged_dir, out_dir / F32_FILE)
        return out_dir
    f32 = out_dir / f".{F32_FILE}.tmp"
    try:
        write_f32_gguf(merged_dir, f32)
        quantize_gguf(f32, out_dir / f"model-{quant}.gguf", quant)
    finally:
        f32.unlink(missing_ok=True)
    return out_dir


def load_gguf(artefact_dir: Path) -> LlamaCppModel:
    return LlamaCppModel(gguf_file(artefact_dir), threads=max(1, torch.get_num_threads()))


# ------------------------------------------------------------------ the quantized formats' gate


def reference_gguf(f32_file: Path, out_dir: Path, quant: str) -> Path:
    """llama.cpp's own ``quant`` of a checked F32 GGUF, default parameters; returns ``out_dir``."""
    quantize_gguf(f32_file, Path(out_dir) / f"model-{quant}.gguf", quant)
    return Path(out_dir)


def tokenization_check(
    merged_dir: Path, model: LlamaCppModel, ids: torch.Tensor, mask: torch.Tensor
) -> dict[str, Any]:
    """Held-out texts (the held-out ids decoded) tokenized by llama.cpp and by the model's
    own tokenizer: ``{"texts", "identical", "first_mismatch"?}``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir), local_files_only=True)
    texts = dict.fromkeys(
        str(tokenizer.decode([int(t) for t in row[m.bool()]], skip_special_tokens=True))
        for row, m in zip(ids, mask, strict=True)
    )
    texts.pop("", None)
    identical, first = 0, None
    for text in texts:
        if model.tokenize(text) == list(tokenizer(text)["input_ids"]):
            identical += 1
        elif first is None:
            first = text[:80]
    result: dict[str, Any] = {"texts": len(texts), "identical": identical}
    if first is not None:
        result["first_mismatch"] = first
    return result


CONVERSION = Conversion(
    name="gguf-f32",
    file_name=F32_FILE,
    write=write_f32_gguf,
    load=lambda file: LlamaCppModel(file, threads=max(1, torch.get_num_threads()), f32_cache=True),
    gate=QualityGate(max_kl=1e-5, min_top1_agreement=0.99),
    runtime="llama.cpp, F32 weights, F32 KV cache",
    tokenization=tokenization_check,
)
"""fedlora's HF → GGUF conversion, as every GGUF artefact's gate checks it (see
:mod:`fedlora.export.reference`): only float rounding may separate it from the merged model."""
