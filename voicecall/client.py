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

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from voicecall.control.protocol import CALL_ERROR, METHOD_NOT_FOUND

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
    """
    The client side of the control socket. `on_notification(method, params)` receives
    notifications (`voicecall.event`); `on_request(method, params)` answers the daemon's own
    requests (`voicecall.respond`, once registered as the responder) with a result or a
    Deferred of one; an exception becomes a JSON-RPC error.
    """

    def __init__(
        self,
        on_notification: Callable[[str, Any], None] | None = None,
        on_request: Callable[[str, Any], Any] | None = None,
    ) -> None:
        self._ids = itertools.count(1)
        self._waiting: dict[int, Deferred] = {}
        self._buffer = b""
        self._on_notification = on_notification
        self._on_request = on_request
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
        if "method" in message:
            if "id" not in message:
                if self._on_notification is not None:
                    self._on_notification(message["method"], message.get("params"))
            else:
                self._answer(message["id"], message["method"], message.get("params"))
            return
        d = self._waiting.pop(message.get("id"), None)
        if d is None:
            return
        if "error" in message:
            err = message["error"]
            d.errback(RemoteError(err.get("code", 0), err.get("message", ""), err.get("data")))
        else:
            d.callback(message.get("result"))

    def _answer(self, rid: Any, method: str, params: Any) -> None:
        def reply(payload: dict) -> None:
            if self.transport is not None and self.connected:
                self.transport.write(json.dumps({"jsonrpc": "2.0", "id": rid, **payload}).encode() + b"\n")

        if self._on_request is None:
            reply({"error": {"code": METHOD_NOT_FOUND, "message": f"Method not found: {method}"}})
            return
        d = maybeDeferred(self._on_request, method, params)
        d.addCallbacks(
            lambda result: reply({"result": result}),
            lambda f: reply({"error": {"code": CALL_ERROR, "message": f.getErrorMessage()}}),
        )

    def connectionLost(self, reason: Failure) -> None:
        waiting, self._waiting = self._waiting, {}
        for d in waiting.values():
            d.errback(ConnectionClosed("voicecall closed the connection"))
        self.closed.callback(None)


async def connect(
    reactor,
    socket_path: str,
    on_notification: Callable[[str, Any], None] | None = None,
    timeout: float = 5,
    on_request: Callable[[str, Any], Any] | None = None,
) -> RpcClient:
    """
    Connect to the control socket at `socket_path` (within `timeout` seconds).

    `on_notification(method, params)` receives the daemon's notifications, from the first one on:
    after a C{voicecall.subscribe} call, every call event as C{("voicecall.event", entry)}.
    `on_request(method, params)` answers the daemon's own requests (C{voicecall.respond}, once
    this connection registered as the responder: see L{RpcClient}).
    """
    endpoint = UNIXClientEndpoint(reactor, socket_path, timeout=timeout)
    return await endpoint.connect(Factory.forProtocol(lambda: RpcClient(on_notification, on_request)))
