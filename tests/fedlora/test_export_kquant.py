"""Q4_K_M on a user's K-quant-capable checkpoint: real K-quant tensors, run and gated in llama.cpp.

The base is built by :mod:`fedlora.model` (the embedded default's recipe with
hidden 256 / FFN 512, one layer and a very short pretraining) and passed as
``fedlora export --model PATH``, as a user's own ``save_pretrained`` checkpoint
is. Every weight matrix then has rows that are multiples of the K-quant block
(256), so llama.cpp must write Q4_K / Q6_K for all of them; the embedded
default (hidden 128, FFN 344) falls back to Q5_0 / Q8_0 / F16 instead, which is
what these tests must tell apart.

Quality: 20 pretraining steps leave the base far from converged (public eval
loss about 4.1 nats, held-out perplexity about 100), but its next-token
distributions are already peaked on the notes' common words, so KL and top-1
agreement against the merged model measure quantization error rather than ties
(measured: KL 5e-4, top-1 0.96-0.97); the default Q4_K_M gate (KL ≤ 1e-2,
top-1 ≥ 0.90) is applied unchanged. A longer-trained K-quant-capable model is
measured by ``bench/export_formats.py`` (see ``--kquant-base``).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import pytest

from fedlora.cli.export import add_export_parser, cmd_export
from fedlora.config import FedloraConfig
from fedlora.export.gguf import LlamaCppModel, describe_gguf, quantize_gguf, write_f32_gguf
from fedlora.model import BaseModelSpec, default_model_path
from tests.fedlora.test_export_support import (
    save_adapter,
    single_thread,  # noqa: F401  (autouse fixture)
)

SPEC = BaseModelSpec(
    name="kquant-test-llama",
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_layers=1,
    public_records=320,
    pretrain_steps=20,
)
HELDOUT_RECORDS = 100


@pytest.fixture(scope="module")
def kquant_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(base, run_dir)``: the K-quant-capable base and a finished run's directory on it."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("kquant")
    base = default_model_path(root / "models", SPEC)
    run = root / "run"
    run.mkdir()
    config = FedloraConfig().replace(
        model={"path": str(base)}, data={"server_eval_max": HELDOUT_RECORDS}
    )
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True)
    save_adapter(model, run / "adapter", seed=1, scale=0.02)
    return base, run


def _export(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fedlora")
    add_export_parser(parser.add_subparsers(dest="command"))
    return cmd_export(parser.parse_args(["export", *argv]))


def _written_types(gguf_path: Path) -> tuple[Counter[str], int]:
    """Tensor types in the file as llama.cpp wrote them, and how many tensors are matrices."""
    from gguf import GGUFReader

    tensors = GGUFReader(str(gguf_path)).tensors
    return Counter(t.tensor_type.name for t in tensors), sum(len(t.shape) >= 2 for t in tensors)


@pytest.mark.slow
def test_q4_k_m_export_of_a_user_checkpoint_is_real_k_quants_within_the_gate(
    kquant_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    base, run = kquant_run

    assert _export(str(run), "--profile", "phone-low", "--model", str(base)) == 0

    manifest = json.loads((run / "export" / "manifest.json").read_text())
    q4 = {a["name"]: a for a in manifest["artefacts"]}["gguf-q4_k_m"]
    merged = {a["name"]: a for a in manifest["artefacts"]}["merged-fp32"]
    types, matrices = _written_types(run / "export" / "gguf-q4_k_m" / "model-q4_k_m.gguf")
    # Every matrix a K-quant (Q4_K, Q6_K for attn_v / ffn_down / the tied embedding); norms F32.
    assert set(types) == {"F32", "Q4_K", "Q6_K"}
    assert types["Q4_K"] + types["Q6_K"] == matrices == 8
    assert q4["details"]["tensor_types"] == dict(sorted(types.items()))
    assert q4["details"]["k_quant_tensors"] == matrices
    assert "note" not in q4["details"] and "k_quant_fallback" not in q4["details"]
    # Measured in llama.cpp on the coordinator's held-out text, and released within the gate
    # set by llama.cpp's own Q4_K_M of fedlora's checked F32 conversion (the same file here).
    quality, gate = q4["quality"], q4["gate"]
    assert quality["tokens"] > 1000
    assert gate["kind"] == "reference" and gate["reference"]["identical_to_artefact"]
    assert quality["kl"] <= gate["max_kl"] == pytest.approx(quality["kl"] * 1.5 + 1e-4)
    assert quality["top1_agreement"] >= gate["min_top1_agreement"]
    assert gate["conversion"]["kl"] < 1e-5 and gate["conversion"]["tokenization"]["texts"] > 0
    assert quality["perplexity"] == pytest.approx(quality["reference_perplexity"], rel=0.05)
    assert q4["total_bytes"] < merged["total_bytes"] / 4  # ~4.5 bits per weight vs 32
    assert "Q4_K" in capsys.readouterr().out


def test_q4_k_m_names_the_matrices_that_fell_back_when_only_some_rows_fit(
    kquant_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """Hidden 256 but FFN 320: the FFN matrices cannot be K-quants, the manifest must say which."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    base, _ = kquant_run
    odd = tmp_path / "ffn320"
    config = AutoConfig.from_pretrained(str(base), local_files_only=True)
    config.intermediate_size = 320
    AutoModelForCausalLM.from_config(config).save_pretrained(str(odd))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, odd / name)
    f32 = write_f32_gguf(odd, tmp_path / "model-f32.gguf")

    quantize_gguf(f32, tmp_path / "q4" / "model-q4_k_m.gguf", "q4_k_m")

    details = describe_gguf(tmp_path / "q4")
    # ffn_down's rows are 320 long: no K-quant; gate/up have 256-long rows and stay K-quants.
    assert details["k_quant_fallback"] == ["blk.0.ffn_down.weight"]
    assert details["k_quant_tensors"] == 7
    assert "1 weight matrices" in details["note"]
    assert LlamaCppModel(tmp_path / "q4" / "model-q4_k_m.gguf").greedy([1, 5, 6], 3)
