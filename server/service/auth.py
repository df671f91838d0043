"""Who is calling: every call to the coordinator's services is signed, and checked here.

A call carries the caller's id, a timestamp and an ECDSA signature over
``method|id|timestamp`` (see :mod:`fedlora.keys.signing`). The caller is a
device in ``DIR/registry/devices.json`` (re-read when it changes, so devices can
be registered while the coordinator runs) or the operator, whose key is
``DIR/tls/operator.pub``. :class:`AuthInterceptor` checks every call before any
servicer runs and hands the servicer the verified :class:`Caller` as a third
argument, so a servicer registered without it fails instead of serving anonymous
calls. What a caller may do (its own budget only, operator-only RPCs) is the
servicers' decision.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fedlora.errors import ConfigError
from fedlora.keys import (
    MAX_CLOCK_SKEW_S,
    METADATA_DEVICE,
    METADATA_SIGNATURE,
    METADATA_TIMESTAMP,
    OPERATOR_ID,
    DeviceRegistry,
    load_public_key,
    operator_key_files,
    verify_call,
)
from server.service.status import abort


@dataclass(frozen=True)
class Caller:
    """A verified caller: a registered device, or the operator (``id == "operator"``)."""

    id: str

    @property
    def operator(self) -> bool:
        return self.id == OPERATOR_ID


class Unauthenticated(Exception):
    """The call is not signed by a known key; the message tells the caller what to do."""


class Authenticator:
    """Verifies a call's signature metadata against the registry or the operator key."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        max_skew_s: float = MAX_CLOCK_SKEW_S,
    ) -> None:
        self.registry = DeviceRegistry(data_dir)
        self.operator_pub = operator_key_files(data_dir)[1]
        self.clock = clock
        self.max_skew_s = max_skew_s

    def _key(self, caller: str) -> Any:
        if caller == OPERATOR_ID:
            if not self.operator_pub.is_file():
                raise Unauthenticated(
                    "this coordinator has no operator key: the operator runs "
                    "`fedlora keys init --data-dir DIR` once"
                )
            try:
                return load_public_key(self.operator_pub)
            except ConfigError as err:
                msg = f"the coordinator's operator key is unusable: {err}"
                raise Unauthenticated(msg) from None
        try:
            device = self.registry.get(caller)
        except ConfigError as err:  # a broken registry admits no one
            msg = f"the coordinator's device registry is unreadable: {err}"
            raise Unauthenticated(msg) from None
        if device is None:
            raise Unauthenticated(
                f"device {caller} is not registered with this coordinator: ask the operator to run "
                f"`fedlora keys register --data-dir DIR --device-id {caller} --public-key "
                f"{caller}.pub` with this device's public key"
            )
        return device.key()

    def authenticate(self, method: str, metadata: Sequence[tuple[str, Any]] | None) -> Caller:
        """The verified caller of ``method``, or :class:`Unauthenticated` saying why not."""
        values: dict[str, Any] = {}
        for key, value in metadata or ():
            if key in (METADATA_DEVICE, METADATA_TIMESTAMP, METADATA_SIGNATURE):
                if key in values:
                    raise Unauthenticated(f"the call carries {key} twice")
                values[key] = value
        caller, stamp, signature = (
            values.get(METADATA_DEVICE),
            values.get(METADATA_TIMESTAMP),
            values.get(METADATA_SIGNATURE),
        )
        if not caller or stamp is None or not signature:
            raise Unauthenticated(
                "the call is not signed: devices call with fedlora's service client "
                "(client.service_client) and the key from `fedlora keys device`"
            )
        try:
            timestamp = int(stamp)
        except ValueError:
            raise Unauthenticated(f"the call's timestamp {stamp!r} is not a Unix time") from None
        key = self._key(str(caller))
        if not verify_call(key, method, str(caller), timestamp, bytes(signature)):
            raise Unauthenticated(
                f"the call's signature is not {caller}'s registered key's: sign with the key "
                "registered for it, or ask the operator to register this device's key"
            )
        skew = timestamp - self.clock()
        if abs(skew) > self.max_skew_s:
            raise Unauthenticated(
                f"the call's timestamp is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} "
                f"the coordinator's clock (at most {self.max_skew_s:.0f} s allowed): set the "
                "device's clock right"
            )
        return Caller(str(caller))


def _with_caller(
    behavior: Callable[..., Any], method: str, metadata: Any, auth: Authenticator
) -> Callable[[Any, grpc.ServicerContext], Any]:
    def call(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        try:
            caller = auth.authenticate(method, metadata)
        except Unauthenticated as err:
            abort(context, grpc.StatusCode.UNAUTHENTICATED, str(err))
        return behavior(request_or_iterator, context, caller)

    return call


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every call and passes the :class:`Caller` to the servicer method.

    The check runs in the worker thread that serves the call (not the server's
    polling thread), as part of the method itself.
    """

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method, metadata = handler_call_details.method, handler_call_details.invocation_metadata
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                wrapped = _with_caller(behavior, method, metadata, self.auth)
                return handler._replace(**{kind: wrapped})
        return handler
