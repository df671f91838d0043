"""Client-side mods: behaviour composed around the device client, Flower-style.

``secagg_mod(required, cfg)`` runs fedlora's SecAgg+ (:mod:`fedlora.client.secagg`: Flower's
protocol and messages, fedlora's masks, rounding and packing) on SecAgg+ messages.
A device that *requires* secure aggregation refuses a plain training request
(one whose update would reach the coordinator unmasked); one that does not
require it lets such a request through to the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedlora.client.secagg import fedlora_secaggplus_mod, rounding_source
from fedlora.errors import UpdateError

if TYPE_CHECKING:
    from fedlora.config import FedloraConfig


def is_secagg_message(msg: Message) -> bool:
    """True for the training messages of a SecAgg+ round (any of its four stages)."""
    return (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    )


#: Node config key a deployed device sets (``fedlora device``): "true" unless --allow-plain.
REQUIRE_SECAGG_KEY = "require-secagg"


def secagg_mod(required: bool, cfg: FedloraConfig | None = None) -> Mod:
    """SecAgg+ for SecAgg+ messages; refuse plain training when required.

    ``cfg``: the app's config (None: each message's run config), which says whether a
    simulated device's stochastic rounding is seeded (``privacy.reproducible_noise``).

    ``required`` is the app's setting; a node can also demand it through its
    node config (``require-secagg``), which is how a deployed device insists on
    masking whatever ClientApp configuration the coordinator's run uses.
    """

    secaggplus = fedlora_secaggplus_mod(rounding_source(cfg))

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if is_secagg_message(msg):
            return secaggplus(msg, ctxt, call_next)
        node_wants = str(ctxt.node_config.get(REQUIRE_SECAGG_KEY, "")).lower() == "true"
        if (required or node_wants) and msg.metadata.message_type == MessageType.TRAIN:
            raise UpdateError(
                "this device requires secure aggregation and got a plain training request: "
                "run the coordinator with SecAgg+ on, or set secagg.enabled=false on the device"
            )
        return call_next(msg, ctxt)

    return mod
