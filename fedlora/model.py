"""The base language model: the embedded default, users' own checkpoints, fingerprints.

Nothing here reaches the network. The embedded default is a small LLaMA built
from config on first use (:func:`default_model_path`): a byte-level BPE
tokenizer and a short non-private pretraining, both on the *public* synthetic
split only (never a device's text), so LoRA fine-tuning starts from a base
that already writes the notes' English but knows none of the devices' people,
places and habits. Users' own checkpoints go through the ordinary Hugging Face
``from_pretrained`` path (:func:`load_base_model`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora.data.synthetic import GENERATOR_VERSION, default_records
from fedlora.data.tokenize import encode_texts
from fedlora.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

# Bump when the build recipe below changes: it is part of the cache key.
RECIPE_VERSION = 1
BUILD_INFO = "fedlora_base.json"
SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_PUBLIC_EVAL_RECORDS = 500


@dataclass(frozen=True)
class BaseModelSpec:
    """How the embedded default base model is built (every field is in the cache key)."""

    name: str = "fedlora-tiny-llama"
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 344
    max_positions: int = 256
    seed: int = 0
    public_records: int = 6000
    pretrain_steps: int = 300
    batch_size: int = 32
    seq_len: int = 64
    learning_rate: float = 3e-3

    def __post_init__(self) -> None:
        for field in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_positions",
            "public_records",
            "batch_size",
            "seq_len",
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"BaseModelSpec.{field} must be a positive integer, got {value!r}"
                )
        if self.pretrain_steps < 0 or not self.learning_rate > 0:
            raise ConfigError("BaseModelSpec.pretrain_steps must be >= 0 and learning_rate > 0")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(
                f"hidden_size {self.hidden_size} must split into {self.num_heads} even-sized heads"
            )
        if self.vocab_size < 300:
            raise ConfigError(
                "vocab_size must be at least 300 (256 bytes + special tokens + merges)"
            )
        if self.seq_len > self.max_positions:
            raise ConfigError(f"seq_len {self.seq_len} exceeds max_positions {self.max_positions}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"BaseModelSpec.name {self.name!r} must be a plain directory name")

    def cache_key(self) -> str:
        blob = json.dumps(
            {"spec": asdict(self), "generator": GENERATOR_VERSION, "recipe": RECIPE_VERSION},
            sort_keys=True,
        )
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


# ------------------------------------------------------------------ default model cache


def default_model_path(
    cache_dir: Path | None = None, spec: BaseModelSpec = BaseModelSpec()
) -> Path:
    """The embedded default base model's directory, built on first use.

    It lives in ``cache_dir / <name>-<hash>``; ``cache_dir`` defaults to
    ``$FEDLORA_CACHE/models`` or ``~/.cache/fedlora/models``. The model is
    built in a temporary directory and renamed into place, under a file lock,
    so a crash never leaves a half-built model and concurrent callers build it
    once (the others wait and use it).
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / spec.cache_key()
    if _is_complete(final):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelError(
            f"cannot create model cache {root}: {err.strerror}; set FEDLORA_CACHE"
        ) from None
    with exclusive_lock(root / f".{final.name}.lock"):
        if _is_complete(final):
            return final
        log.info("building the default base model in %s (once, about a minute)", final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        try:
            _build(spec, tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like ~/.cache
            _move_into_place(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _move_into_place(built: Path, final: Path) -> None:
    if final.exists() and not _is_complete(final):
        shutil.rmtree(final)  # a leftover from before the rename rule: replace it
    try:
        os.replace(built, final)
    except OSError:
        if not _is_complete(final):  # not a concurrent winner (possible without flock)
            raise


def cache_root() -> Path:
    """``$FEDLORA_CACHE/models`` or ``~/.cache/fedlora/models``: where base models are cached."""
    env = os.environ.get("FEDLORA_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "fedlora"
    return base / "models"


def _is_complete(path: Path) -> bool:
    return (path / BUILD_INFO).is_file() and (path / "config.json").is_file()


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if need be) while inside."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): build-then-rename alone keeps the cache whole
        yield
        return
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(spec: BaseModelSpec, out: Path) -> None:
    started = time.perf_counter()
    public = [
        r.text
        for r in default_records(
            1, spec.seed, "public", num_records=spec.public_records + _PUBLIC_EVAL_RECORDS
        )
    ]
    train_texts, eval_texts = public[: spec.public_records], public[spec.public_records :]
    tokenizer = train_tokenizer(train_texts, spec.vocab_size, spec.max_positions)
    model, losses = pretrained_llama(tokenizer, train_texts, spec)
    info = {
        "spec": asdict(spec),
        "cache_key": spec.cache_key(),
        "generator_version": GENERATOR_VERSION,
        "recipe_version": RECIPE_VERSION,
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_first_loss": losses[0] if losses else None,
        "pretrain_last_loss": losses[-1] if losses else None,
        "public_eval_loss": mean_token_loss(model, tokenizer, eval_texts, seq_len=spec.seq_len),
        "torch": torch.__version__,
    }
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    portable_tokenizer_class(out / "tokenizer_config.json")
    info["build_seconds"] = round(time.perf_counter() - started, 1)
    (out / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def train_tokenizer(texts: Sequence[str], vocab_size: int, max_length: int) -> Any:
    """A byte-level BPE tokenizer (bos, eos, pad, unk; BOS prepended) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, core.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )


def portable_tokenizer_class(config_file: Path) -> None:
    """Name the class every transformers release knows (5.x writes its new alias)."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


_portable_tokenizer_class = portable_tokenizer_class  # the name bench/utility.py imports


def pretrained_llama(
    tokenizer: Any, texts: Sequence[str], spec: BaseModelSpec
) -> tuple[Any, list[float]]:
    """A LLaMA of ``spec``'s shape for ``tokenizer``, initialised from ``spec.seed`` (without
    touching the global torch RNG) and pretrained on ``texts``; in eval mode, with the
    pretraining losses."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
        losses = _pretrain(model, tokenizer, texts, spec)
    model.eval()
    return model, losses


def _pretrain(model: Any, tokenizer: Any, texts: Sequence[str], spec: BaseModelSpec) -> list[float]:
    """Plain (non-private) next-token training on public text; returns the loss per step."""
    if spec.pretrain_steps == 0:
        return []
    input_ids, mask = encode_texts(tokenizer, texts, spec.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    warmup = max(1, spec.pretrain_steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, spec.pretrain_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = np.random.default_rng([spec.seed, 1])
    order = rng.permutation(len(texts))
    losses: list[float] = []
    model.train()
    for step in range(spec.pretrain_steps):
        start = (step * spec.batch_size) % len(order)
        rows = torch.as_tensor(np.resize(np.roll(order, -start), spec.batch_size))
        loss = _batch_loss(model, input_ids[rows], mask[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def _batch_loss(model: Any, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    width = int(mask.sum(dim=1).max())
    input_ids, mask = input_ids[:, :width], mask[:, :width]
    labels = input_ids.masked_fill(mask == 0, -100)
    return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss


@torch.no_grad()
def mean_token_loss(
    model: Any, tokenizer: Any, texts: Sequence[str], *, seq_len: int, batch_size: int = 64
) -> float:
    """Mean next-token cross-entropy (nats per predicted token) over ``texts``."""
    if not texts:
        raise ModelError("no texts to evaluate the model on")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    input_ids, mask = encode_texts(tokenizer, texts, seq_len)
    for start in range(0, len(texts), batch_size):
        ids, m = input_ids[start : start + batch_size], mask[start : start + batch_size]
        tokens = int((m[:, 1:]).sum())
        if tokens:
            total += float(_batch_loss(model, ids, m)) * tokens
            count += tokens
    model.train(was_training)
    return total / max(count, 1)


# ------------------------------------------------------------------ users' checkpoints


def load_base_model(path: str | Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local Hugging Face causal-LM directory, in fp32.

    Never reaches the network. A tokenizer without a pad token gets eos as pad.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise ModelError(f"model path {path} does not exist; pass a Hugging Face model directory")
    if path.is_file() and _starts_with(path, b"GGUF"):
        raise ModelError(
            f"{path} is a GGUF file: convert it once with `fedlora models import-gguf {path} "
            "--out DIR` and pass --model DIR"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelError(
            f"{path} is not a Hugging Face model directory (no config.json); "
            "save one with model.save_pretrained()"
        )
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot read {path / 'config.json'}: {_first_line(err)}") from None
    _check_causal_lm(path, config)
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in path.iterdir()):
        raise ModelError(f"{path} has a config but no weight files (*.safetensors or *.bin)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise ModelError(
            f"no usable tokenizer in {path} ({_first_line(err)}); "
            "save one there with tokenizer.save_pretrained()"
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelError(f"cannot load the weights in {path}: {_first_line(err)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"the tokenizer in {path} has no pad or eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(magic)) == magic
    except OSError:
        return False


def _check_causal_lm(path: Path, config: Any) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = list(getattr(config, "architectures", None) or [])
    causal = [a for a in architectures if a.endswith(("ForCausalLM", "LMHeadModel"))]
    is_decoder_lm = (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and not getattr(config, "is_encoder_decoder", False)
        and (causal or not architectures)
    )
    if not is_decoder_lm:
        found = ", ".join(architectures) or "no architectures"
        raise ModelError(
            f"{path} holds a {config.model_type!r} model ({found}), not a causal language model; "
            "use a decoder-only checkpoint (e.g. a *ForCausalLM)"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ------------------------------------------------------------------ fingerprint


def model_fingerprint(path: str | Path) -> str:
    """sha256 over ``config.json`` and the weight files (names and bytes), as hex."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
    weights = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if not weights:
        raise ModelError(f"{path} has no weight files (*.safetensors or *.bin) to fingerprint")
    digest = hashlib.sha256()
    for file in [path / "config.json", *weights]:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()
