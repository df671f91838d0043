"""Per-process state shared by every device or coordinator task in one worker.

A simulation worker (a Ray actor) serves many devices in turn. Building the
base model, the LoRA wrapper and the fleet's data once per process — not once
per device or per round — is what keeps a fleet of hundreds of devices cheap.
Everything here is keyed by the parts of the config it depends on, so two runs
with different configs in one process never share state by accident.

A process that serves device after device (a simulation worker, ``fedlora device``'s
resident runner: :func:`stay_warm`) starts building the model in a background thread
as soon as its first message names the run's config (:func:`warm_up`; that message is
discovery's, which needs no model), so the first training request finds it built or
half built instead of paying the whole 1.4 s (the embedded default) in round 1. A
process per message (Flower's own ``flwr-clientapp``) never does: it would build a
model it exits before using.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.config import FedloraConfig

if TYPE_CHECKING:  # not imported here: the data side is read without loading torch
    import numpy as np
    import torch

    from fedlora.data.fleet import Fleet

#: Thread pools a simulation worker's libraries size from the environment (OpenMP,
#: OpenBLAS, MKL): one each, in Ray's workers (:func:`fedlora.simulate.worker_environment`)
#: and in the calibration prefetch (:mod:`fedlora.simprefetch`); a second BLAS thread
#: spins between calls and doubles a σ calibration's CPU.
WORKER_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

_MAX_ENCODED = 32
_lock = threading.RLock()
#: Held while a model is built, so a data lookup (discovery) never waits for a model.
_model_lock = threading.Lock()
_warming: set[tuple[Any, ...]] = set()
_long_lived = False
_models: dict[tuple[Any, ...], ModelBundle] = {}
_fleets: dict[tuple[Any, ...], Fleet] = {}
_encoded: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}


@dataclass
class ModelBundle:
    """The base model with the LoRA adapter attached, its tokenizer and the initial adapter."""

    model: Any  # peft.PeftModel
    tokenizer: Any
    initial_arrays: list[np.ndarray]
    names: list[str]


def resolve_model_path(cfg: FedloraConfig) -> Path:
    """The checkpoint to fine-tune: the user's ``model.path``, a catalog entry's converted
    checkpoint (``model.path`` = its name, converted on first use), or the embedded default."""
    from fedlora.catalog import catalog_entry, catalog_model_path
    from fedlora.model import default_model_path

    if cfg.model.path and catalog_entry(cfg.model.path) is not None:
        return catalog_model_path(cfg.model.path)
    if cfg.model.path:
        return Path(cfg.model.path)
    return default_model_path()


def model_bundle(cfg: FedloraConfig) -> ModelBundle:
    """Load the base model once per process and attach the configured LoRA adapter.

    The adapter's initial values come from ``cfg.seed``, so the coordinator and
    every device agree on the starting point without sending it.
    """
    from fedlora.adapter import adapter_names, attach_lora, get_adapter_arrays
    from fedlora.model import load_base_model

    path = resolve_model_path(cfg)
    key = (str(path), cfg.lora, cfg.seed)
    bundle = _models.get(key)
    if bundle is not None:
        return bundle
    with _model_lock:
        bundle = _models.get(key)
        if bundle is None:
            base, tokenizer = load_base_model(path)
            model = attach_lora(base, cfg.lora, seed=cfg.seed)
            bundle = ModelBundle(
                model=model,
                tokenizer=tokenizer,
                initial_arrays=get_adapter_arrays(model),
                names=adapter_names(model),
            )
            _models[key] = bundle
        return bundle


def stay_warm() -> None:
    """Say that this process serves many messages, so :func:`warm_up` is worth its work."""
    global _long_lived
    _long_lived = True


def warm_up(cfg: FedloraConfig) -> bool:
    """In a process that stays warm, start building ``cfg``'s model bundle in a daemon
    thread, once; returns whether a build was started.

    Whoever needs the model then waits for that build (:func:`model_bundle`) rather
    than starting another. A build that fails is forgotten: the message that needs the
    model builds it again and reports the error in its own reply.
    """
    if not _long_lived:
        return False
    # The config's own fields, not the resolved path: resolving a catalog name may
    # convert the model (tens of seconds), which belongs in the thread, not in discovery.
    key = (cfg.model.path, cfg.lora, cfg.seed)
    with _lock:
        if key in _warming:
            return False
        _warming.add(key)

    def build() -> None:
        try:
            model_bundle(cfg)
        except Exception:  # a bad model path: said by the message that needs the model
            with _lock:
                _warming.discard(key)

    threading.Thread(target=build, name="fedlora-warm-up", daemon=True).start()
    return True


def fleet(cfg: FedloraConfig) -> Fleet:
    """The simulated fleet's data, partitioned deterministically from the config's seed."""
    from fedlora import fleetsim
    from fedlora.data.fleet import build_fleet

    d = cfg.data
    scaled = any(p.data_scale != 1 for p in cfg.fleet.profiles)
    key = (
        cfg.fleet.profiles if scaled else (),
        d.path,
        d.partition,
        d.dirichlet_alpha,
        d.heldout_fraction,
        d.server_fraction,
        d.server_eval_max,
        cfg.fleet.num_devices,
        cfg.seed,
    )
    with _lock:
        f = _fleets.get(key)
        if f is None:
            f = build_fleet(
                d.path,
                num_devices=cfg.fleet.num_devices,
                partition=d.partition,
                alpha=d.dirichlet_alpha,
                seed=cfg.seed,
                heldout_fraction=d.heldout_fraction,
                server_fraction=d.server_fraction,
                server_eval_max=d.server_eval_max,
                scale=(lambda dev: fleetsim.data_scale(cfg.fleet, cfg.seed, dev))
                if scaled
                else None,
            )
            _fleets[key] = f
        return f


#: Devices of the embedded fleet whose notes are written one device at a time; above
#: this many, device ids no longer sort in index order and the whole fleet is built.
_MAX_LAZY_DEVICES = 10_000
_MAX_DEVICE_DATA = 64
_indexes: dict[tuple[Any, ...], Any] = {}
_device_data: dict[tuple[Any, ...], Any] = {}


def _embedded_devices(cfg: FedloraConfig) -> Any:
    """The embedded natural fleet, device by device (:class:`EmbeddedDevices`), or None
    when the fleet's data must be built whole (a data path, iid or Dirichlet)."""
    from fedlora import fleetsim
    from fedlora.data.fleet import EmbeddedDevices

    d, n = cfg.data, cfg.fleet.num_devices
    if d.path is not None or d.partition != "natural" or n > _MAX_LAZY_DEVICES:
        return None
    scaled = any(p.data_scale != 1 for p in cfg.fleet.profiles)
    key = (cfg.fleet.profiles if scaled else (), n, cfg.seed, d.heldout_fraction, d.server_fraction)
    with _lock:
        hit = _indexes.get(key)
        if hit is None:
            hit = EmbeddedDevices(
                n,
                seed=cfg.seed,
                heldout_fraction=d.heldout_fraction,
                server_fraction=d.server_fraction,
                scale=(lambda dev: fleetsim.data_scale(cfg.fleet, cfg.seed, dev))
                if scaled
                else None,
            )
            _indexes[key] = hit
        return hit


def device_info(cfg: FedloraConfig, index: int) -> tuple[str, int]:
    """Simulated device ``index``'s id and number of training records.

    On the embedded fleet this writes no note and keeps one integer per device: what a
    simulation worker needs to answer discovery for a fleet of thousands.
    """
    lazy = _embedded_devices(cfg)
    if lazy is not None:
        return lazy.device_id(index), lazy.num_train(index)
    data = device_data(cfg, index)
    return data.device, len(data.train)


def device_count(cfg: FedloraConfig) -> int:
    """How many devices the simulated fleet has (the embedded one's without building it)."""
    if _embedded_devices(cfg) is not None:
        return cfg.fleet.num_devices
    return len(fleet(cfg).devices)


def device_data(cfg: FedloraConfig, index: int) -> Any:
    """Simulated device ``index``'s records (:class:`fedlora.data.fleet.DeviceData`).

    On the embedded fleet only that device's notes are written, and a worker keeps the
    last few devices it served, not the fleet.
    """
    from fedlora.errors import DataError

    lazy = _embedded_devices(cfg)
    if lazy is None:
        devices = fleet(cfg).devices
        if not 0 <= index < len(devices):
            raise DataError(f"partition-id {index} is outside the fleet of {len(devices)}")
        return devices[index]
    key = (id(lazy), index)
    with _lock:
        hit = _device_data.get(key)
        if hit is None:
            hit = lazy.device(index)
            if len(_device_data) >= _MAX_DEVICE_DATA:  # bounded: a worker serves many devices
                _device_data.pop(next(iter(_device_data)))
            _device_data[key] = hit
        return hit


_local: dict[tuple[Any, ...], Any] = {}


def local_data(cfg: FedloraConfig, path: str, device: str) -> Any:
    """A deployed device's own records (re-read when the file changes)."""
    from fedlora.data.fleet import local_device_data

    p = Path(path)
    stat = p.stat() if p.exists() else None
    key = (str(p.resolve()), device, stat.st_mtime_ns if stat else None, cfg.seed)
    with _lock:
        hit = _local.get(key)
        if hit is None:
            hit = local_device_data(
                p, device, heldout_fraction=cfg.data.heldout_fraction, seed=cfg.seed
            )
            _local[key] = hit
        return hit


def encoded(
    cfg: FedloraConfig, name: str, texts: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of ``texts`` (one record = one sequence), cached by name."""
    from fedlora.data.tokenize import encode_texts

    path = resolve_model_path(cfg)
    key = (str(path), cfg.data.seq_len, name, len(texts), hash(texts))
    tokenizer = model_bundle(cfg).tokenizer  # outside _lock: a build there takes a while
    with _lock:
        hit = _encoded.get(key)
        if hit is None:
            hit = encode_texts(tokenizer, list(texts), cfg.data.seq_len)
            if len(_encoded) >= _MAX_ENCODED:  # bounded: a worker serves many devices
                _encoded.pop(next(iter(_encoded)))
            _encoded[key] = hit
        return hit


def clear() -> None:
    """Forget every cached model and dataset (tests use this between configs); waits for a
    model being built."""
    with _model_lock, _lock:
        _warming.clear()
        _models.clear()
        _fleets.clear()
        _encoded.clear()
        _local.clear()
        _indexes.clear()
        _device_data.clear()
