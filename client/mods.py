"""Client-side mods: behaviour composed around the device client, Flower-style.

``secagg_mod(required)`` runs Flower's SecAgg+ protocol on SecAgg+ messages.
A device that *requires* secure aggregation refuses a plain training request
(one whose update would reach the coordinator unmasked); one that does not
require it lets such a request through to the client.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedlora.errors import UpdateError


def is_secagg_message(msg: Message) -> bool:
    """True for the training messages of a SecAgg+ round (any of its four stages)."""
    return (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    )


#: Node config key a deployed device sets (``fedlora device``): "true" unless --allow-plain.
REQUIRE_SECAGG_KEY = "require-secagg"


def secagg_mod(required: bool) -> Mod:
    """SecAgg+ for SecAgg+ messages; refuse plain training when required.

    ``required`` is the app's setting; a node can also demand it through its
    node config (``require-secagg``), which is how a deployed device insists on
    masking whatever ClientApp configuration the coordinator's run uses.
    """

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if is_secagg_message(msg):
            return secaggplus_mod(msg, ctxt, call_next)
        node_wants = str(ctxt.node_config.get(REQUIRE_SECAGG_KEY, "")).lower() == "true"
        if (required or node_wants) and msg.metadata.message_type == MessageType.TRAIN:
            raise UpdateError(
                "this device requires secure aggregation and got a plain training request: "
                "run the coordinator with SecAgg+ on, or set secagg.enabled=false on the device"
            )
        return call_next(msg, ctxt)

    return mod
