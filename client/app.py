"""The device's Flower ClientApp: ``fedlora.client.app:app``.

A deployed SuperNode starts a fresh ``flwr-clientapp`` process for every
message, and SecAgg+ sends four per round, three of which only the
``secaggplus_mod`` handles. So this module imports nothing heavy: torch, the
model and Opacus are loaded (in :mod:`fedlora.client.device_client`) only when a
message reaches the device's own code (training, evaluation, discovery).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedlora.client.mods import secagg_mod

if TYPE_CHECKING:
    from fedlora.client.device_client import DataHook
    from fedlora.config import FedloraConfig


def make_client_app(
    cfg: FedloraConfig | None = None,
    device_root: Path | None = None,
    outer_mods: Sequence[Mod] = (),
    data_hook: DataHook | None = None,
    warm: bool = False,
) -> ClientApp:
    """The ClientApp; with ``cfg`` None it reads the config from the run config.

    A device built with a config that enables SecAgg+ refuses to send an
    unmasked update; one built without a config (a deployed device, or
    ``flwr run .``) follows the coordinator.

    ``device_root`` gives each simulated device a directory of its own
    (``device_root/<device>/ledger.json``) standing in for its local disk.
    ``outer_mods`` run outside SecAgg+ (``fedlora simulate`` puts the simulated fleet's
    :func:`fedlora.client.simulated.simulated_fleet_mod` there). ``data_hook`` changes
    each simulated device's records (``fedlora audit`` inserts its canaries with it; a
    normal run has none). ``warm``: the app runs in processes that serve many messages
    (``fedlora simulate``'s workers), which build the model in the background from their
    first message on (:func:`fedlora.runtime.warm_up`).
    """
    required = cfg.secagg.enabled if cfg is not None else False

    def client_fn(context: Context) -> Any:
        from fedlora.client import preload

        preload.wait()  # a simulation worker's own imports first (one importer at a time)
        import torch

        from fedlora.watchdog import watch_supervisor

        watch_supervisor()  # under `fedlora device`: end with it, even on SIGKILL

        from fedlora import runtime
        from fedlora.client.device_client import DeviceClient
        from fedlora.config import config_from_run_config

        torch.set_num_threads(1)  # one core per simulated device; Ray gives each actor one
        resolved = cfg if cfg is not None else config_from_run_config(dict(context.run_config))
        if warm:
            runtime.stay_warm()
        runtime.warm_up(resolved)  # no-op in a process per message
        return DeviceClient(resolved, context, device_root, data_hook).to_client()

    return ClientApp(client_fn=client_fn, mods=[*outer_mods, secagg_mod(required, cfg)])


app = make_client_app()
