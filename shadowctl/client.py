"""Connecting to the controller's fleet API."""

from __future__ import annotations

import os

import grpc

from shadowplane.v1 import fleet_pb2_grpc as fgrpc

DEFAULT_CONTROLLER = "127.0.0.1:7400"


def controller_address(arg: str | None) -> str:
    return arg or os.environ.get("SHADOWCTL_CONTROLLER") or DEFAULT_CONTROLLER


def fleet(address: str) -> tuple[grpc.Channel, fgrpc.FleetStub]:
    channel = grpc.insecure_channel(address)
    return channel, fgrpc.FleetStub(channel)


def describe_rpc_error(e: grpc.RpcError, address: str) -> str:
    code = e.code() if isinstance(e, grpc.Call) else None
    details = e.details() if isinstance(e, grpc.Call) else str(e)
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"controller at {address} is unreachable ({details}); is shadowplane-controller running?"
    name = code.name if code is not None else "error"
    return f"{name}: {details}"
