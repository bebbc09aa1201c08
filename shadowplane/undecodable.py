"""Requests that do not decode as the message they are sent as (corrupt wire format, a string field that is
not UTF-8, a field of the wrong wire type) are bad input like any other: every gRPC server refuses them with
INVALID_ARGUMENT naming the message, instead of gRPC's UNKNOWN "Unexpected DecodeError" and an error
logged as if the daemon had failed.

A Python client cannot even send such bytes (its library refuses to encode them); clients in other
languages, and anyone writing to the socket, can. Streaming requests are left alone: a stream's servicer
reads its messages one by one and decides itself what a bad one means.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError


@dataclass(frozen=True)
class Undecodable:
    """What the deserializer hands over instead of a message it could not decode."""

    error: str


def _safe(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as e:
            return Undecodable(str(e))

    return decode


async def _refuse(request: Undecodable, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"request: not a valid protobuf message ({request.error[:200]}); send the message this method "
        "takes (proto/shadowplane/v1), with strings in UTF-8",
    )


class RefuseUndecodable(grpc.aio.ServerInterceptor):
    """Installed on every gRPC server the daemons run (the controller's, each agent's peer port)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: Any = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler  # type: ignore[no-any-return]
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if isinstance(request, Undecodable):
                    await _refuse(request, context)
                reply = unary(request, context)
                return await reply if inspect.isawaitable(reply) else reply

            return handler._replace(  # type: ignore[no-any-return]
                request_deserializer=_safe(handler.request_deserializer), unary_unary=unary_unary
            )
        stream = handler.unary_stream
        if not inspect.isasyncgenfunction(stream):
            return handler  # type: ignore[no-any-return]

        async def unary_stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await _refuse(request, context)
            async for reply in stream(request, context):
                yield reply

        return handler._replace(  # type: ignore[no-any-return]
            request_deserializer=_safe(handler.request_deserializer), unary_stream=unary_stream
        )
