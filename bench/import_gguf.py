"""What importing a GGUF costs: time, and perplexity of the float model vs llama.cpp's.

``fedlora models import-gguf`` (and ``--model smollm2-135m-instruct``) dequantize a
catalog entry's GGUF (SmolLM2-135M-Instruct, Q4_1) into a float32 checkpoint with
transformers. The dequantization itself is exact (the float weights are the Q4_1
values), but the model users fine-tune then runs in float32, while the original
file runs in llama.cpp, whose Q4_1 kernels also quantize activations (Q8_1 blocks).
On the same ``--tokens`` tokens of ``../shared/data/tinyshakespeare.txt`` (the
imported tokenizer's ids, fed unchanged to both) this measures:

* ``transformers_f32``: the imported checkpoint, float32, in transformers;
* ``llamacpp_q4_1``: the original GGUF in llama.cpp (``logits_all``, one pass);
* ``llamacpp_f32`` (unless ``--no-f32-gguf``): an F32 GGUF of the imported weights
  (fedlora's export writer) in llama.cpp, which separates "llama.cpp's kernels"
  from "the weights": it should match ``transformers_f32`` to float rounding.

Per runtime the perplexity, and against ``transformers_f32`` the mean KL
divergence and top-1 agreement of the next-token distributions; the greedy
completion of "The capital of France is" from each; the fresh import's wall and
CPU time and peak RSS (in a child process). Figure: perplexity of
``transformers_f32`` ÷ perplexity of ``llamacpp_q4_1``.

    .venv/bin/python bench/import_gguf.py [--tokens 512] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import benchkit as bk
import numpy as np
import torch

PLAY = bk.REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
PROMPT = "The capital of France is"
COMPLETION_TOKENS = 8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a catalog name")
    p.add_argument("--tokens", type=int, default=512, help="tokens of text scored")
    p.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    p.add_argument("--no-f32-gguf", action="store_true", help="skip the llama.cpp F32 run")
    p.add_argument("--quick", action="store_true", help="256 tokens, no F32 GGUF")
    return p.parse_args(argv)


def timed_import(gguf: Path, out: Path) -> dict[str, Any]:
    """A fresh ``fedlora models import-gguf`` in a child process: wall, CPU, peak RSS."""
    code = (
        "import json, resource, sys, time\n"
        "t = time.perf_counter(); c = time.process_time()\n"
        "from fedlora.gguf_import import import_gguf\n"
        "import_gguf(sys.argv[1], sys.argv[2])\n"
        "print(json.dumps({'wall_s': time.perf_counter() - t, 'cpu_s': time.process_time() - c,"
        " 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(gguf), str(out)],
        stdout=subprocess.PIPE,
        check=True,
        text=True,
        cwd=bk.REPO,
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {k: round(v, 1) for k, v in figures.items()}


def text_ids(tokenizer: Any, n: int) -> list[int]:
    text = PLAY.read_text(encoding="utf-8")[: n * 8]  # far more characters than tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n]
    if len(ids) < n:
        raise SystemExit(f"{PLAY} gives only {len(ids)} tokens")
    return list(ids)


def log_probs(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def score(logp: np.ndarray, ids: list[int], reference: np.ndarray | None) -> dict[str, Any]:
    """Perplexity of ``ids[1:]``; against ``reference`` (log-probs) KL(ref ‖ this), top-1."""
    targets = np.array(ids[1:])
    nll = -logp[np.arange(len(targets)), targets]
    out: dict[str, Any] = {"perplexity": round(float(np.exp(nll.mean())), 4)}
    if reference is not None:
        kl = (np.exp(reference) * (reference - logp)).sum(axis=-1)
        out["kl_vs_transformers"] = float(f"{kl.mean():.3e}")
        out["top1_agreement"] = round(float((reference.argmax(-1) == logp.argmax(-1)).mean()), 4)
    return out


def transformers_run(path: Path, ids: list[int]) -> tuple[np.ndarray, str, Any]:
    from fedlora.model import load_base_model

    model, tokenizer = load_base_model(path)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].numpy()
        prompt = tokenizer(PROMPT, return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=COMPLETION_TOKENS, do_sample=False)
    completion = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
    return log_probs(logits), completion, tokenizer


def llamacpp_run(
    gguf: Path, ids: list[int], tokenizer: Any, threads: int
) -> tuple[np.ndarray, str, bool]:
    import llama_cpp

    from fedlora.export.gguf import without_weight_repacking

    with without_weight_repacking(llama_cpp):  # as fedlora's export measures (AMX crash)
        llm = llama_cpp.Llama(
            model_path=str(gguf),
            n_ctx=max(1024, len(ids) + 16),
            n_batch=len(ids),
            logits_all=True,
            n_threads=threads,
            verbose=False,
        )
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids) - 1], dtype=np.float32)
    prompt = tokenizer(PROMPT)["input_ids"]
    same_tokens = list(llm.tokenize(PROMPT.encode(), add_bos=False, special=False)) == prompt
    new: list[int] = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
        if token == llm.token_eos() or len(new) >= COMPLETION_TOKENS:
            break
        new.append(int(token))
    completion = tokenizer.decode(new)
    llm.close()
    return log_probs(logits), completion, same_tokens


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bk.setup_env()
    if args.quick:
        args.tokens, args.no_f32_gguf = 256, True
    if not PLAY.is_file():
        bk.emit({"bench": "import_gguf", "skipped": f"{PLAY} not found"})
        return 0
    torch.set_num_threads(args.threads)
    from fedlora.catalog import catalog_entry, fetch_gguf

    entry = catalog_entry(args.model)
    if entry is None:
        raise SystemExit(f"{args.model} is not a catalog name")
    runs: dict[str, Any] = {}
    with bk.stdout_to_stderr(), tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        gguf, origin = fetch_gguf(entry, Path(tmp))
        bk.log(f"importing {gguf} afresh (child process)")
        imported = Path(tmp) / "imported"
        import_cost = timed_import(gguf, imported)
        checkpoint_bytes = sum(f.stat().st_size for f in imported.iterdir())
        info = json.loads((imported / "fedlora-import.json").read_text(encoding="utf-8"))
        bk.log("transformers, float32")
        ids = text_ids(load_tokenizer(imported), args.tokens)
        ref, completion, tokenizer = transformers_run(imported, ids)
        runs["transformers_f32"] = {**score(ref, ids, None), "completion": completion}
        bk.log("llama.cpp, the original Q4_1 GGUF")
        logp, completion, same = llamacpp_run(gguf, ids, tokenizer, args.threads)
        runs["llamacpp_q4_1"] = {**score(logp, ids, ref), "completion": completion}
        if not args.no_f32_gguf:
            from fedlora.export.gguf import write_f32_gguf

            bk.log("llama.cpp, an F32 GGUF of the imported weights")
            f32 = write_f32_gguf(imported, Path(tmp) / "imported-f32.gguf")
            logp, completion, _ = llamacpp_run(f32, ids, tokenizer, args.threads)
            runs["llamacpp_f32"] = {**score(logp, ids, ref), "completion": completion}
    figure = runs["transformers_f32"]["perplexity"] / runs["llamacpp_q4_1"]["perplexity"]
    bk.emit(
        {
            "bench": "import_gguf",
            "figure": round(figure, 4),
            "unit": "ratio (perplexity of the imported float32 model in transformers ÷ "
            "perplexity of the original Q4_1 GGUF in llama.cpp)",
            "comparison": (
                f"{entry.name} ({entry.requirement}, {origin['obtained']}): the checkpoint "
                "`fedlora models import-gguf` writes (Q4_1 dequantized to float32, run by "
                "transformers) vs the original GGUF run by llama.cpp "
                f"{_version('llama_cpp_python')}, on the same {len(ids)} tokens of "
                "tinyshakespeare (the imported tokenizer's ids, no BOS, one pass each)"
            ),
            "tokens": len(ids),
            "runs": runs,
            "prompt": PROMPT,
            "llamacpp_tokenizes_the_prompt_alike": same,
            "import": {
                **import_cost,
                "gguf_bytes": info["source"]["bytes"],
                "checkpoint_bytes": checkpoint_bytes,
                "tensor_types": info["source"]["tensor_types"],
                "parameters": info["model"]["parameters"],
            },
            "threads": args.threads,
            "versions": info["versions"],
            "machine": bk.machine(),
        }
    )
    return 0


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
