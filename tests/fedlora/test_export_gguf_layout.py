"""The HF → GGUF conversion without llama.cpp: q/k layout, metadata, refusals."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedlora.errors import ModelError
from fedlora.export.gguf import describe_gguf, permute_rotary, write_f32_gguf
from tests.fedlora.test_export_gguf_support import tiny_gguf
from tests.fedlora.test_export_support import single_thread  # noqa: F401  (autouse fixture)


@pytest.fixture
def tiny_gguf_hidden128(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The merged checkpoint of a model shaped like the embedded default (128 / 344)."""
    return tiny_gguf(tmp_path_factory, hidden=128, intermediate=344).merged


def _rope_hf(x: np.ndarray, pos: int, base: float = 10000.0) -> np.ndarray:
    """transformers' LLaMA RoPE on one head: dimension i rotates with i + d/2."""
    d = x.shape[-1]
    theta = pos * base ** (-np.arange(0, d, 2) / d)
    cos, sin = np.concatenate([np.cos(theta)] * 2), np.concatenate([np.sin(theta)] * 2)
    rotated = np.concatenate([-x[d // 2 :], x[: d // 2]])
    return x * cos + rotated * sin


def _rope_ggml(x: np.ndarray, pos: int, base: float = 10000.0) -> np.ndarray:
    """ggml's normal RoPE (LLaMA): dimension 2i rotates with 2i + 1."""
    d = x.shape[-1]
    theta = pos * base ** (-np.arange(0, d, 2) / d)
    even, odd = x[0::2], x[1::2]
    out = np.empty_like(x)
    out[0::2] = even * np.cos(theta) - odd * np.sin(theta)
    out[1::2] = even * np.sin(theta) + odd * np.cos(theta)
    return out


@pytest.mark.parametrize("permute", [True, False])
def test_permuted_qk_gives_the_same_attention_scores_under_ggml_rope(permute: bool) -> None:
    rng = np.random.default_rng(0)
    n_head, head_dim, hidden = 4, 16, 32
    wq, wk = rng.normal(size=(2, n_head * head_dim, hidden))
    xq, xk = rng.normal(size=(2, hidden))
    wq_g, wk_g = (permute_rotary(w, n_head) if permute else w for w in (wq, wk))

    def scores(w_q: np.ndarray, w_k: np.ndarray, rope: Callable[..., np.ndarray]) -> np.ndarray:
        q, k = (w_q @ xq).reshape(n_head, head_dim), (w_k @ xk).reshape(n_head, head_dim)
        return np.array([rope(q[h], 7) @ rope(k[h], 3) for h in range(n_head)])

    hf, ggml = scores(wq, wk, _rope_hf), scores(wq_g, wk_g, _rope_ggml)

    # Only the permuted layout gives ggml the scores transformers computes.
    assert np.allclose(hf, ggml) is permute


def test_f32_gguf_holds_every_tensor_in_f32_and_the_full_tokenizer(
    tmp_path: Path, tiny_gguf_hidden128: Path
) -> None:
    from gguf import GGUFReader

    out = write_f32_gguf(tiny_gguf_hidden128, tmp_path / "m" / "model-f32.gguf")

    reader = GGUFReader(str(out))
    fields = {name: f.contents() for name, f in reader.fields.items()}
    tokenizer = json.loads((tiny_gguf_hidden128 / "tokenizer.json").read_text())
    config = json.loads((tiny_gguf_hidden128 / "config.json").read_text())
    assert describe_gguf(out.parent)["tensor_types"] == {"F32": 2 + 9 * 2 + 1}
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == config["vocab_size"]
    assert fields["tokenizer.ggml.tokens"][0] == "<s>"
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 3]  # control tokens
    assert len(fields["tokenizer.ggml.merges"]) == len(tokenizer["model"]["merges"])
    assert fields["tokenizer.ggml.bos_token_id"] == config["bos_token_id"]
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.embedding_length"] == 128


def test_unsupported_architecture_names_the_supported_ones(
    tmp_path: Path, tiny_gguf_hidden128: Path
) -> None:
    model = tmp_path / "gpt2"
    shutil.copytree(tiny_gguf_hidden128, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(config))

    with pytest.raises(ModelError, match=r"supports LlamaForCausalLM.*GPT2LMHeadModel"):
        write_f32_gguf(model, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_non_byte_level_tokenizer_is_refused(tmp_path: Path, tiny_gguf_hidden128: Path) -> None:
    model = tmp_path / "wordlevel"
    shutil.copytree(tiny_gguf_hidden128, model)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "WhitespaceSplit"}
    (model / "tokenizer.json").write_text(json.dumps(spec))

    with pytest.raises(ModelError, match="byte-level BPE"):
        write_f32_gguf(model, tmp_path / "out.gguf")


def test_llama3_rope_freqs_turn_the_default_frequencies_into_transformers_llama3_ones() -> None:
    """llama.cpp divides each default frequency by ``rope_freqs``; the result must be the
    inverse frequencies transformers computes for ``rope_type: llama3`` (all three bands)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from fedlora.export.gguf_arch import llama3_rope_freqs
    from fedlora.testing.checkpoints import LLAMA3_ROPE

    rope = dict(LLAMA3_ROPE)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_parameters=rope)
    default = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)

    divisors = llama3_rope_freqs(config)["rope_freqs.weight"]
    hf, _ = ROPE_INIT_FUNCTIONS["llama3"](config)

    assert np.allclose(default / divisors, hf.numpy(), rtol=1e-6)
    assert divisors[0] == 1.0 and divisors[-1] == 8.0  # kept, divided by factor
    assert ((divisors > 1.0) & (divisors < 8.0)).any()  # and smoothed in between


def test_gemma3_gguf_holds_norms_plus_one_and_its_attention_layout(tmp_path: Path) -> None:
    from gguf import GGUFReader
    from safetensors.numpy import load_file

    from fedlora.testing.checkpoints import tiny_checkpoint

    model = tiny_checkpoint("gemma3", tmp_path / "model", steps=2)  # norms off zero

    reader = GGUFReader(str(write_f32_gguf(model, tmp_path / "model.gguf")))
    fields = {name: f.contents() for name, f in reader.fields.items()}
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    hf = load_file(str(model / "model.safetensors"))
    assert fields["general.architecture"] == "gemma3"
    assert fields["gemma3.attention.sliding_window"] == 8
    assert fields["gemma3.attention.sliding_window_pattern"] == [True, False]
    assert fields["gemma3.rope.freq_base"] == 1_000_000.0
    assert fields["gemma3.rope.freq_base_swa"] == 10_000.0
    assert fields["gemma3.attention.key_length"] == 32  # wider than hidden / heads
    for hf_name, gguf_name in [
        ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
        ("model.layers.0.self_attn.q_norm.weight", "blk.0.attn_q_norm.weight"),
        ("model.layers.1.post_feedforward_layernorm.weight", "blk.1.post_ffw_norm.weight"),
        ("model.norm.weight", "output_norm.weight"),
    ]:
        assert np.array_equal(tensors[gguf_name], hf[hf_name] + 1.0), hf_name
    # q/k are not permuted: llama.cpp's gemma graph rotates halves, as transformers does
    q = hf["model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(tensors["blk.0.attn_q.weight"].reshape(q.shape), q)
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
