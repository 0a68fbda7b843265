# -*- test-case-name: tests.test_cli -*-
"""
A small JSON-RPC client for the control socket, used by the CLI and usable by a gateway.

    client = await connect(reactor, "/run/voicecall/rpc.sock")
    result = await client.call("voicecall.initiate", {"to": "+15550001234", "message": "Hi"})
"""
from __future__ import annotations

import itertools
import json
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

MAX_LINE_BYTES = 16 * 1024 * 1024


class RemoteError(Exception):
    """The daemon answered with a JSON-RPC error; `str(exc)` is its message."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = data


class ConnectionClosed(Exception):
    """The daemon closed the connection before answering."""


class RpcClient(Protocol):
    def __init__(self, on_notification: Callable[[str, Any], None] | None = None) -> None:
        self._ids = itertools.count(1)
        self._waiting: dict[int, Deferred] = {}
        self._buffer = b""
        self._on_notification = on_notification
        self.closed: Deferred = Deferred()

    def call(self, method: str, params: dict | None = None) -> Deferred:
        rid = next(self._ids)
        d: Deferred = Deferred()
        self._waiting[rid] = d
        line = json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}})
        self.transport.write(line.encode() + b"\n")
        return d

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > MAX_LINE_BYTES:
            self.transport.abortConnection()
            return
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self._message(json.loads(line))

    def _message(self, message: dict) -> None:
        if "id" not in message and "method" in message:
            if self._on_notification is not None:
                self._on_notification(message["method"], message.get("params"))
            return
        d = self._waiting.pop(message.get("id"), None)
        if d is None:
            return
        if "error" in message:
            err = message["error"]
            d.errback(RemoteError(err.get("code", 0), err.get("message", ""), err.get("data")))
        else:
            d.callback(message.get("result"))

    def connectionLost(self, reason: Failure) -> None:
        waiting, self._waiting = self._waiting, {}
        for d in waiting.values():
            d.errback(ConnectionClosed("voicecall closed the connection"))
        self.closed.callback(None)


async def connect(reactor, socket_path: str, on_notification=None, timeout: float = 5) -> RpcClient:
    endpoint = UNIXClientEndpoint(reactor, socket_path, timeout=timeout)
    return await endpoint.connect(Factory.forProtocol(lambda: RpcClient(on_notification)))
