"""Weight-only int8: the quantizer's error bound, the artefact on disk, and its runtime."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fedlora.errors import ExportError, ModelError
from fedlora.export.int8 import (
    Int8WeightOnlyLinear,
    dequantize_groups,
    group_size_for,
    load_int8_model,
    quantize_groups,
    quantize_int8,
)
from fedlora.export.merge import load_fp32_model, merge_adapter
from fedlora.export.quality import compare_logits
from tests.fedlora.test_export_support import (
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_setup,
)

DECODER_LINEARS = {
    f"model.layers.{layer}.{block}.{proj}"
    for layer in range(2)
    for block, projs in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
    for proj in (f"{p}_proj" for p in projs)
}


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tiny = tiny_setup(tmp_path_factory)
    return merge_adapter(tiny.base, tiny.adapter, tmp_path_factory.mktemp("int8") / "merged")


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.Tensor, torch.Tensor]:
    tiny = tiny_setup(tmp_path_factory)
    return tiny.input_ids, tiny.attention_mask


# ---------------------------------------------------------------- the quantizer


def test_dequantization_error_is_at_most_half_a_step_per_element() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 96, generator=gen) * torch.logspace(-4, 1, 64)[:, None]
    weight[3] = 0.0  # an all-zero row

    qweight, scale = quantize_groups(weight, 32)
    error = (dequantize_groups(qweight, scale) - weight).abs()
    step = scale.float().repeat_interleave(32, dim=1)

    assert qweight.dtype == torch.int8 and scale.dtype == torch.float16
    assert qweight.shape == weight.shape and scale.shape == (64, 3)
    assert torch.all(error <= step / 2 * (1 + 1e-5))
    assert int(qweight.abs().max()) <= 127 and int(qweight.min()) >= -127
    # the scale is rounded up to fp16: where it is a normal fp16 number (≥ 2**-14), a group's
    # largest value lands on 126 or 127 (subnormal scales are coarser, their bound still holds)
    peaks = qweight.reshape(64, 3, 32).abs().amax(dim=2)[scale.float() >= 2.0**-14]
    assert peaks.numel() > 100 and int(peaks.min()) >= 126
    assert not qweight[3].any()


def test_groups_follow_the_input_axis_and_a_row_that_does_not_divide_keeps_one_scale() -> None:
    weight = torch.ones(2, 64)
    weight[:, 32:] = 100.0  # the second group's large values must not coarsen the first's
    qweight, scale = quantize_groups(weight, 32)
    assert torch.equal(qweight, torch.full((2, 64), 127, dtype=torch.int8))
    assert scale[:, 0].float().tolist() == pytest.approx([1 / 127] * 2, rel=1e-3)
    assert group_size_for(576) == 32 and group_size_for(48) == 48  # 48 = whole row
    with pytest.raises(ExportError, match="does not divide"):
        quantize_groups(torch.ones(2, 48), 32)


def test_rounding_is_half_to_even() -> None:
    weight = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5]])  # scale is exactly 1

    qweight, scale = quantize_groups(weight)

    assert scale.tolist() == [[1.0]]
    assert qweight.tolist() == [[127, 0, 2, 2, 0, -2, 4]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad: float) -> None:
    weight = torch.ones(2, 3)
    weight[1, 1] = bad

    with pytest.raises(ExportError, match="NaN or infinite"):
        quantize_groups(weight)


def test_int8_linear_matches_a_linear_with_the_dequantized_weight() -> None:
    gen = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(16, 8)
    qweight, scale = quantize_groups(linear.weight, 8)
    layer = Int8WeightOnlyLinear(16, 8, bias=True, group_size=8)
    layer.load_state_dict({"qweight": qweight, "scale": scale, "bias": linear.bias.detach()})
    x = torch.randn(5, 16, generator=gen)

    expected = torch.nn.functional.linear(x, dequantize_groups(qweight, scale), linear.bias)

    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- the artefact


def test_artefact_stores_int8_weights_and_fp32_scales_for_every_decoder_linear(
    merged: Path, tmp_path: Path
) -> None:
    out = quantize_int8(merged, tmp_path / "int8")

    config = json.loads((out / "quant_config.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    expected = DECODER_LINEARS

    assert set(config["quantized_modules"]) == expected
    assert config["scheme"] == "int8-weight-only-per-group" and config["lm_head"] == "kept"
    assert all(dtypes[f"{m}.qweight"] == "I8" and dtypes[f"{m}.scale"] == "F16" for m in expected)
    assert not any(k.endswith(".weight") and k.rpartition(".")[0] in expected for k in keys)
    assert dtypes["lm_head.weight"] == "F16" and dtypes["model.embed_tokens.weight"] == "F16"
    assert {"config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}


def test_linear_weights_take_a_quarter_of_their_fp32_bytes(merged: Path, tmp_path: Path) -> None:
    out = quantize_int8(merged, tmp_path / "int8")
    modules = json.loads((out / "quant_config.json").read_text())["quantized_modules"]

    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        fp32 = sum(f.get_tensor(f"{m}.weight").nbytes for m in modules)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        int8 = sum(f.get_tensor(f"{m}.qweight").nbytes for m in modules)
        scales = sum(f.get_tensor(f"{m}.scale").nbytes for m in modules)

    assert int8 == fp32 // 4
    assert (int8 + scales) / fp32 <= 1.0625 / 4  # as llama.cpp's Q8_0 where groups fit
    total_ratio = (out / "model.safetensors").stat().st_size / (
        merged / "model.safetensors"
    ).stat().st_size
    assert total_ratio < 0.4  # embeddings and lm_head stay in fp16


def test_quantizing_twice_gives_identical_bytes(merged: Path, tmp_path: Path) -> None:
    first = quantize_int8(merged, tmp_path / "a") / "model.safetensors"
    second = quantize_int8(merged, tmp_path / "b") / "model.safetensors"

    assert (
        hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()
    )


# ---------------------------------------------------------------- the runtime


def test_int8_model_runs_and_passes_the_default_gate(merged: Path, heldout, tmp_path: Path) -> None:
    reference = load_fp32_model(merged)

    model = load_int8_model(quantize_int8(merged, tmp_path / "int8"))
    quality = compare_logits(reference, model, *heldout)

    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q_proj, Int8WeightOnlyLinear) and q_proj.qweight.dtype == torch.int8
    assert isinstance(model.get_submodule("lm_head"), torch.nn.Linear)
    assert quality["kl"] <= 1e-3 and quality["top1_agreement"] >= 0.98
    assert quality["kl"] > 0  # it really is quantized
    assert quality["perplexity"] == pytest.approx(quality["reference_perplexity"], rel=0.05)


def test_quantized_lm_head_is_opt_in_and_still_passes(
    merged: Path, heldout, tmp_path: Path
) -> None:
    reference = load_fp32_model(merged)

    out = quantize_int8(merged, tmp_path / "int8", quantize_lm_head=True)
    quality = compare_logits(reference, load_int8_model(out), *heldout)

    assert "lm_head" in json.loads((out / "quant_config.json").read_text())["quantized_modules"]
    assert quality["kl"] <= 1e-3 and quality["top1_agreement"] >= 0.98


def test_tied_embeddings_are_stored_once_and_tied_again_on_load(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    tiny = tiny_setup(tmp_path_factory, tie=True)
    merged = merge_adapter(tiny.base, tiny.adapter, tmp_path / "merged")

    out = quantize_int8(merged, tmp_path / "int8", quantize_lm_head=True)
    model = load_int8_model(out)
    quality = compare_logits(load_fp32_model(merged), model, tiny.input_ids, tiny.attention_mask)

    config = json.loads((out / "quant_config.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    assert config["lm_head"] == "tied" and "lm_head" not in config["quantized_modules"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert quality["kl"] <= 1e-3 and quality["top1_agreement"] >= 0.98


def test_a_version_1_artefact_with_one_scale_per_row_still_loads(
    merged: Path, heldout, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    out = quantize_int8(merged, tmp_path / "int8")
    config = json.loads((out / "quant_config.json").read_text())
    reference = load_fp32_model(merged)
    tensors = load_file(str(out / "model.safetensors"))
    for name in config["quantized_modules"]:  # rewrite as version 1 wrote it
        weight = reference.get_submodule(name).weight
        qweight, scale = quantize_groups(weight)
        tensors[f"{name}.qweight"], tensors[f"{name}.scale"] = qweight, scale.float().reshape(-1)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    v1 = {**config, "version": 1, "scheme": "int8-weight-only-per-channel"}
    del v1["group_sizes"]
    (out / "quant_config.json").write_text(json.dumps(v1))

    model = load_int8_model(out)
    quality = compare_logits(reference, model, *heldout)

    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q_proj, Int8WeightOnlyLinear) and q_proj.scale.shape[1] == 1
    assert 0 < quality["kl"] <= 1e-3


def test_loading_a_directory_without_quant_config_is_a_model_error(merged: Path) -> None:
    with pytest.raises(ModelError, match=r"no int8 artefact .*quant_config\.json"):
        load_int8_model(merged)
