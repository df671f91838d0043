"""Who is calling: every call to the coordinator's services is signed, and checked here.

A call carries the caller's id, a timestamp, a nonce and an ECDSA signature over
``method|id|timestamp|nonce`` (see :mod:`fedlora.keys.signing`). The caller is a
device in ``DIR/registry/devices.json`` (re-read when it changes, so devices can
be registered while the coordinator runs) or the operator, whose key is
``DIR/tls/operator.pub``. :class:`AuthInterceptor` checks every call before any
servicer runs and hands the servicer the verified :class:`Caller` as a third
argument, so a servicer registered without it fails instead of serving anonymous
calls. What a caller may do (its own budget only, operator-only RPCs) is the
servicers' decision.

Replay: a verified call's (caller, nonce) is remembered until its timestamp falls
out of the acceptance window (timestamp + max skew; at most 2 × max skew after it
arrived, for a timestamp that was max skew ahead), and a second call with the
same pair is refused. Only calls whose signature verified are remembered, so a
sender without a registered key cannot fill the memory; a registered caller may
have at most ``max_nonces_per_caller`` calls in the window (a cap it can only
reach by flooding, and then only its own calls are refused until its oldest
expire: nothing is forgotten early, which would reopen replay).
"""

from __future__ import annotations

import heapq
import threading
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
    METADATA_NONCE,
    METADATA_SIGNATURE,
    METADATA_TIMESTAMP,
    OPERATOR_ID,
    DeviceRegistry,
    load_public_key,
    operator_key_files,
    valid_nonce,
    verify_call,
)
from fedlora.server.service.status import abort


@dataclass(frozen=True)
class Caller:
    """A verified caller: a registered device, or the operator (``id == "operator"``)."""

    id: str

    @property
    def operator(self) -> bool:
        return self.id == OPERATOR_ID


class Unauthenticated(Exception):
    """The call is not signed by a known key; the message tells the caller what to do."""

    code = grpc.StatusCode.UNAUTHENTICATED


class TooManyCalls(Unauthenticated):
    """A verified caller has more calls in the replay window than the coordinator remembers."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


MAX_NONCES_PER_CALLER = 10_000
"""Calls one caller may make within one replay window (up to 2 × max skew, 10 minutes):
16 a second sustained, far above what a device or ``fedlora run`` makes. Each remembered
call takes about 250 bytes, so a caller at the cap holds about 2.5 MB."""


class NonceMemory:
    """The (caller, nonce) pairs of accepted calls, each until its timestamp expires.

    Thread-safe: :meth:`use` checks and records in one step under a lock, so of two
    concurrent calls with the same nonce exactly one gets through.
    """

    def __init__(self, max_per_caller: int = MAX_NONCES_PER_CALLER) -> None:
        self.max_per_caller = max_per_caller
        self._lock = threading.Lock()
        self._seen: dict[str, dict[str, float]] = {}  # caller → nonce → expiry
        self._expiries: list[tuple[float, str, str]] = []  # heap of (expiry, caller, nonce)

    def __len__(self) -> int:
        with self._lock:
            return len(self._expiries)

    def _prune(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] < now:
            _, caller, nonce = heapq.heappop(self._expiries)
            nonces = self._seen[caller]
            del nonces[nonce]
            if not nonces:
                del self._seen[caller]

    def use(self, caller: str, nonce: str, expiry: float, now: float) -> None:
        """Record ``nonce`` for ``caller`` until ``expiry``; refuse one already recorded."""
        with self._lock:
            self._prune(now)
            nonces = self._seen.setdefault(caller, {})
            if nonce in nonces:
                raise Unauthenticated(
                    f"the call replays an earlier call of {caller} (nonce {nonce[:12]}… already "
                    "used): every call must be signed afresh"
                )
            if len(nonces) >= self.max_per_caller:
                wait = min(nonces.values()) - now
                raise TooManyCalls(
                    f"{caller} made {len(nonces)} calls within the replay window, the most this "
                    f"coordinator remembers: its calls are refused until the oldest expire "
                    f"(in {max(wait, 0):.0f} s)"
                )
            nonces[nonce] = expiry
            heapq.heappush(self._expiries, (expiry, caller, nonce))


class Authenticator:
    """Verifies a call's signature metadata against the registry or the operator key."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        max_skew_s: float = MAX_CLOCK_SKEW_S,
        max_nonces_per_caller: int = MAX_NONCES_PER_CALLER,
    ) -> None:
        self.registry = DeviceRegistry(data_dir)
        self.operator_pub = operator_key_files(data_dir)[1]
        self.clock = clock
        self.max_skew_s = max_skew_s
        self.nonces = NonceMemory(max_nonces_per_caller)

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
        """The verified caller of ``method``, or :class:`Unauthenticated` saying why not.

        A call that passes is remembered: the same metadata again is refused.
        """
        names = (METADATA_DEVICE, METADATA_TIMESTAMP, METADATA_NONCE, METADATA_SIGNATURE)
        values: dict[str, Any] = {}
        for key, value in metadata or ():
            if key in names:
                if key in values:
                    raise Unauthenticated(f"the call carries {key} twice")
                values[key] = value
        caller, stamp, nonce, signature = (values.get(name) for name in names)
        if not caller or stamp is None or not signature:
            raise Unauthenticated(
                "the call is not signed: devices call with fedlora's service client "
                "(fedlora.client.service_client) and the key from `fedlora keys device`"
            )
        if nonce is None:
            raise Unauthenticated(
                f"the call carries no nonce ({METADATA_NONCE}): it was signed by a fedlora "
                "without replay protection; update fedlora on the calling machine"
            )
        if not valid_nonce(nonce):
            raise Unauthenticated(
                f"the call's nonce is not 32 to 64 lowercase hex digits ({METADATA_NONCE}): "
                "sign calls with fedlora.keys.sign_call"
            )
        try:
            timestamp = int(stamp)
        except ValueError:
            raise Unauthenticated(f"the call's timestamp {stamp!r} is not a Unix time") from None
        key = self._key(str(caller))
        if not verify_call(key, method, str(caller), timestamp, str(nonce), bytes(signature)):
            raise Unauthenticated(
                f"the call's signature is not {caller}'s registered key's: sign with the key "
                "registered for it, or ask the operator to register this device's key"
            )
        now = self.clock()
        skew = timestamp - now
        if abs(skew) > self.max_skew_s:
            raise Unauthenticated(
                f"the call's timestamp is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} "
                f"the coordinator's clock (at most {self.max_skew_s:.0f} s allowed): set the "
                "device's clock right"
            )
        # Accepted until the clock passes timestamp + skew: remember the nonce that long.
        self.nonces.use(str(caller), str(nonce), timestamp + self.max_skew_s, now)
        return Caller(str(caller))


def _with_caller(
    behavior: Callable[..., Any], method: str, metadata: Any, auth: Authenticator
) -> Callable[[Any, grpc.ServicerContext], Any]:
    def call(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        try:
            caller = auth.authenticate(method, metadata)
        except Unauthenticated as err:
            abort(context, err.code, str(err))
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
