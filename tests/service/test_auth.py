"""The Authenticator's replay protection: each signed call is accepted once, for its window."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from fedlora.keys import MAX_CLOCK_SKEW_S, load_private_key, sign_call
from fedlora.server.service.auth import Authenticator, Caller, TooManyCalls, Unauthenticated
from tests.service.conftest import Coordinator

METHOD = "/fedlora.v1.ModelService/ListModels"
T0 = 1_700_000_000


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def auth(coordinator: Coordinator, clock: Clock) -> Authenticator:
    return Authenticator(coordinator.data_dir, clock=clock)


@pytest.fixture
def sign(coordinator: Coordinator) -> Callable[..., Any]:
    keys = {d: load_private_key(coordinator.key(d)) for d in ("d1", "d2")}

    def make(device: str = "d1", timestamp: int = T0) -> Any:
        return sign_call(keys[device], METHOD, device, timestamp)

    return make


def test_a_call_is_accepted_once(auth: Authenticator, sign: Any) -> None:
    call = sign()

    assert auth.authenticate(METHOD, call) == Caller("d1")
    with pytest.raises(Unauthenticated, match=r"^the call replays an earlier call of d1 "):
        auth.authenticate(METHOD, call)
    assert auth.authenticate(METHOD, sign()) == Caller("d1")  # a fresh nonce is fine


def test_every_call_gets_a_fresh_nonce(sign: Any) -> None:
    nonces = {dict(sign())["fedlora-nonce"] for _ in range(100)}

    assert len(nonces) == 100
    assert all(len(n) == 32 and int(n, 16) >= 0 for n in nonces)  # 128 bits, hex


def test_a_nonce_is_remembered_for_the_whole_window_of_its_timestamp(
    auth: Authenticator, sign: Any, clock: Clock
) -> None:
    # arrange: a timestamp as far ahead as is accepted: it stays acceptable for 2 x skew
    call = sign(timestamp=T0 + MAX_CLOCK_SKEW_S)
    auth.authenticate(METHOD, call)

    # act / assert: refused as a replay until the timestamp itself is too old
    clock.now = T0 + 2 * MAX_CLOCK_SKEW_S
    with pytest.raises(Unauthenticated, match="replays"):
        auth.authenticate(METHOD, call)
    clock.now = T0 + 2 * MAX_CLOCK_SKEW_S + 1
    with pytest.raises(Unauthenticated, match="behind the coordinator's clock"):
        auth.authenticate(METHOD, call)


def test_expired_nonces_are_pruned(auth: Authenticator, sign: Any, clock: Clock) -> None:
    for _ in range(5):
        auth.authenticate(METHOD, sign("d1"))
    auth.authenticate(METHOD, sign("d2", timestamp=T0 + 100))
    assert len(auth.nonces) == 6

    clock.now = T0 + MAX_CLOCK_SKEW_S + 1  # d1's five have expired, d2's has not
    auth.authenticate(METHOD, sign("d1", timestamp=int(clock.now)))

    assert len(auth.nonces) == 2
    clock.now = T0 + 100 + MAX_CLOCK_SKEW_S + 1
    auth.authenticate(METHOD, sign("d2", timestamp=int(clock.now)))
    assert len(auth.nonces) == 2  # d2's old one gone, the new one and d1's last remain


def test_only_verified_calls_are_remembered(
    auth: Authenticator, coordinator: Coordinator, sign: Any
) -> None:
    forged = sign_call(load_private_key(coordinator.key("d2")), METHOD, "d1", T0)
    stranger = sign_call(load_private_key(coordinator.key("stranger")), METHOD, "stranger", T0)
    stale = sign(timestamp=T0 - MAX_CLOCK_SKEW_S - 1)

    for call in (forged, stranger, stale):
        with pytest.raises(Unauthenticated):
            auth.authenticate(METHOD, call)

    assert len(auth.nonces) == 0


def test_a_caller_past_the_cap_is_refused_until_its_calls_expire(
    coordinator: Coordinator, sign: Any, clock: Clock
) -> None:
    auth = Authenticator(coordinator.data_dir, clock=clock, max_nonces_per_caller=3)
    for _ in range(3):
        auth.authenticate(METHOD, sign("d1"))

    with pytest.raises(TooManyCalls) as err:
        auth.authenticate(METHOD, sign("d1"))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(err.value) == (
        "d1 made 3 calls within the replay window, the most this coordinator remembers: "
        f"its calls are refused until the oldest expire (in {MAX_CLOCK_SKEW_S} s)"
    )
    assert auth.authenticate(METHOD, sign("d2")) == Caller("d2")  # the cap is per caller

    clock.now = T0 + MAX_CLOCK_SKEW_S + 1
    assert auth.authenticate(METHOD, sign("d1", timestamp=int(clock.now))) == Caller("d1")


def test_concurrent_replays_let_exactly_one_call_through(auth: Authenticator, sign: Any) -> None:
    # arrange: 16 threads hold the same signed call and start together
    call, threads = sign(), 16
    barrier = threading.Barrier(threads)
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt() -> None:
        barrier.wait()
        try:
            auth.authenticate(METHOD, call)
            outcome = "accepted"
        except Unauthenticated as err:
            outcome = "replay" if "replays" in str(err) else str(err)
        with lock:
            outcomes.append(outcome)

    # act
    workers = [threading.Thread(target=attempt) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()

    # assert
    assert sorted(outcomes) == ["accepted"] + ["replay"] * (threads - 1)


def test_concurrent_fresh_calls_are_all_accepted_and_all_remembered(
    auth: Authenticator, sign: Any
) -> None:
    calls = [[sign(d) for _ in range(15)] for d in ("d1", "d2", "d1", "d2")]
    accepted: list[Caller] = []
    lock = threading.Lock()

    def run(batch: list[Any]) -> None:
        for call in batch:
            caller = auth.authenticate(METHOD, call)
            with lock:
                accepted.append(caller)

    workers = [threading.Thread(target=run, args=(batch,)) for batch in calls]
    for w in workers:
        w.start()
    for w in workers:
        w.join()

    assert len(accepted) == 60
    assert len(auth.nonces) == 60
