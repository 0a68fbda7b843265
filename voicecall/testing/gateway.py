"""
A stand-in gateway for tests and demos: connects to the RPC socket, registers as the responder
and answers each `voicecall.respond` with `answer(params)` (a string, a Deferred of one, or an
exception to fail with). It records every request it got.
"""
from __future__ import annotations

from typing import Any, Callable

from attrs import define, field
from twisted.internet.defer import Deferred, maybeDeferred

from voicecall.client import RpcClient, connect


@define
class TestGateway:
    answer: Callable[[dict], Any]
    requests: list[dict] = field(factory=list)
    client: RpcClient | None = None

    async def register(self, reactor, socket_path: str) -> "TestGateway":
        self.client = await connect(reactor, socket_path, on_request=self._on_request)
        await self.client.call("voicecall.responder.register", {})
        return self

    def _on_request(self, method: str, params: Any) -> Deferred:
        if method != "voicecall.respond":
            raise ValueError(f"unexpected request {method}")
        self.requests.append(params)
        return maybeDeferred(self.answer, params).addCallback(lambda words: {"spoken": words})

    def close(self) -> None:
        if self.client is not None and self.client.transport is not None:
            self.client.transport.loseConnection()
