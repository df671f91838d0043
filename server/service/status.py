"""Ending a call with a gRPC status: the one place servicers turn problems into status codes."""

from __future__ import annotations

from typing import NoReturn

import grpc

from fedlora.errors import FedloraError


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with ``code`` and ``message`` (what the device's error will say)."""
    context.abort(code, message)
    raise RuntimeError("grpc context.abort returned")  # it raises; this tells type checkers


def abort_on(context: grpc.ServicerContext, err: FedloraError) -> NoReturn:
    """A fedlora error on the coordinator's side (a tampered ledger, a broken run directory)
    is FAILED_PRECONDITION: the call was fine, the coordinator's state is not."""
    abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"coordinator: {err}")
