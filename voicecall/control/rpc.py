# -*- test-case-name: tests.test_rpc -*-
"""
The control API: JSON-RPC 2.0, one JSON object per line, on a UNIX socket (DESIGN.md contract).

Methods (SPEC §18.2 plus additions): `voicecall.initiate` (issue 17's per-call choices too:
`from`, `voice`, `greeting`, `objective`, `maxDurationSeconds`, `answeringMachine`, `record`),
`voicecall.continue` (`input`: "speech", "dtmf" or "speech dtmf"), `voicecall.speak`,
`voicecall.end` (`message`: a goodbye played before the hang-up), `voicecall.dtmf`,
`voicecall.transfer`, `voicecall.status` (without `callId`: the active calls),
legacy `voicecall.start`, `voicecall.subscribe` (then `voicecall.event` notifications for every
call event), `voicecall.health`, `voicecall.cluster` (the nodes of a cluster: `voicecall status
--cluster`), and `voicecall.responder.register`: the connection becomes the
gateway that answers callers; voicecall then sends it requests `voicecall.respond` with params
`{callId, direction, from, to, text, transcript}` and speaks the `spoken` of its result
`{"spoken": "..."}` (the most recent registered connection is asked).

Each request runs on its own: a `continue` that waits minutes for the caller holds up no other
request, on its connection or any other; answers go out as they complete, matched by `id`.
Failures are JSON-RPC error objects whose `message` is the SPEC error text (code -32000), with
-32700 for malformed JSON, -32600 for an invalid request (or a line over 1 MiB), -32601 for an
unknown method and -32602 for bad params. The connection stays open after every error.

A peer must read what it is sent. While its answers are backed up (the transport's buffer is
full: it pauses us as its producer) no further requests are read from it or handled (those
already read wait, so one read's worth of small requests cannot queue a thousand answers), at
most `MAX_IN_FLIGHT` of its requests are worked on at once, and a peer that stays backed up for
`STALL_TIMEOUT` seconds is disconnected. At most `MAX_CONNECTIONS` connections are served at
once (a new one past it is closed when accepted), and the request data they hold (a line still
arriving may be 1 MiB) beyond `FREE_BUFFER_BYTES` each is capped at `MAX_SHARED_BUFFER_BYTES`
in all (the connection that would pass it is closed), so what all peers can hold is bounded too. What is queued for it, answers and
notifications alike, is capped at `MAX_QUEUED_BYTES`: the answer or event that would pass the
cap closes the connection instead (one log line). The count is an upper bound of what the
transport holds unsent: its buffer size while it has not paused us (it pauses us past that),
plus everything written since it did; it drops to nothing when the transport has written it all
and resumes us.
"""
from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Mapping

from attrs import define, frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from voicecall.control.protocol import (
    CALL_ERROR,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
)
from voicecall.domain.manager import CallError
from voicecall.domain.model import CallOptions

MAX_LINE_BYTES = 1024 * 1024
#: Bytes of answers and notifications that may wait for one peer that does not read them.
MAX_QUEUED_BYTES = 4 * 1024 * 1024
#: Requests of one connection worked on at once; past it the connection is not read.
MAX_IN_FLIGHT = 256
#: Seconds a connection may leave its answers unread (the transport paused us) before it is closed.
STALL_TIMEOUT = 10.0
#: Connections at once; past it a new one is closed as soon as it is accepted.
MAX_CONNECTIONS = 64
#: Bytes of unhandled request data (a line still arriving, lines not yet handled) each connection
#: may hold on its own; what it holds beyond this comes out of the factory's shared LineBudget.
FREE_BUFFER_BYTES = 64 * 1024
#: The shared budget: past it, the connection whose buffer would exceed it is closed.
MAX_SHARED_BUFFER_BYTES = 8 * 1024 * 1024


@frozen
class RpcLimits:
    """What the server holds for its peers: the caps above, one value the factory hands each connection."""

    max_queued_bytes: int = MAX_QUEUED_BYTES
    max_in_flight: int = MAX_IN_FLIGHT
    stall_timeout: float = STALL_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    max_shared_buffer: int = MAX_SHARED_BUFFER_BYTES


class LineBudget:
    """What all connections' request buffers hold beyond FREE_BUFFER_BYTES each, capped in total."""

    def __init__(self, limit: int = MAX_SHARED_BUFFER_BYTES) -> None:
        self.limit = limit
        self.used = 0
        self._charged: dict[object, int] = {}

    def charge(self, owner: object, held: int) -> bool:
        """`owner` now holds `held` bytes; False (nothing charged) when that passes the limit."""
        excess = max(0, held - FREE_BUFFER_BYTES)
        before = self._charged.get(owner, 0)
        if excess > before and self.used - before + excess > self.limit:
            return False
        self.used += excess - before
        if excess:
            self._charged[owner] = excess
        else:
            self._charged.pop(owner, None)
        return True

    def release(self, owner: object) -> None:
        self.used -= self._charged.pop(owner, 0)


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = data


def _text(params: Mapping[str, Any], name: str) -> str | None:
    """A trimmed string param; None when absent or blank; -32602 when not a string."""
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RpcError(INVALID_PARAMS, f"Invalid params: {name} must be a string")
    return value.strip() or None


def _integer(params: Mapping[str, Any], name: str) -> int | None:
    """A whole-number param; None when absent; -32602 when not a JSON integer."""
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RpcError(INVALID_PARAMS, f"Invalid params: {name} must be an integer")
    return value


def _flag(params: Mapping[str, Any], name: str) -> bool | None:
    """A true/false param; None when absent; -32602 when not a JSON boolean."""
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise RpcError(INVALID_PARAMS, f"Invalid params: {name} must be true or false")
    return value


def _options(params: Mapping[str, Any]) -> CallOptions:
    """An initiate's own choices (issue 17), type-checked; their values are the manager's to check."""
    return CallOptions(
        from_number=_text(params, "from"),
        voice=_text(params, "voice"),
        greeting=_text(params, "greeting"),
        objective=_text(params, "objective"),
        max_duration_seconds=_integer(params, "maxDurationSeconds"),
        answering_machine=_text(params, "answeringMachine"),
        record=_flag(params, "record"),
    )


def _input(params: Mapping[str, Any]) -> str:
    """What a continue listens for ("speech" when absent); the manager checks the value."""
    return _text(params, "input") or "speech"


@define(repr=False)
class RpcMethods:
    """The method table: plain async functions of a params dict."""

    _manager: Any  # voicecall.domain.manager.CallManager
    _clock: IReactorTime
    _default_to: str | None = None
    _provider_name: str = "mock"
    _webhook_url: Callable[[], "str | None"] = lambda: None
    _started_at: float = 0.0
    #: In a cluster (tap.py: voicecall.cluster.router.Router.route): runs a command for a call
    #: here, or forwards it to the node that owns the call and answers with that node's answer.
    _route: Callable[..., Awaitable[Any]] | None = None
    #: In a cluster (tap.py: voicecall.cluster.nodes.NodeRegistry.nodes): every node as the
    #: store sees it now, as JSON; None on a single node (SQLite store).
    _cluster_nodes: Callable[[], Awaitable[list[dict]]] | None = None

    _log = Logger()

    def table(self) -> dict[str, Callable[[Mapping[str, Any]], Awaitable[Any]]]:
        return {
            "voicecall.initiate": self.initiate,
            "voicecall.start": self.start,
            "voicecall.continue": self.continue_,
            "voicecall.speak": self.speak,
            "voicecall.end": self.end,
            "voicecall.dtmf": self.dtmf,
            "voicecall.transfer": self.transfer,
            "voicecall.status": self.status,
            "voicecall.health": self.health,
            "voicecall.cluster": self.cluster,
        }

    async def initiate(self, params: Mapping[str, Any]) -> dict:
        message = _text(params, "message")
        if message is None:
            raise CallError("message required")
        return await self._place(params, message)

    async def start(self, params: Mapping[str, Any]) -> dict:
        if _text(params, "to") is None:
            raise CallError("to required")
        return await self._place(params, _text(params, "message"))

    async def _place(self, params: Mapping[str, Any], message: str | None) -> dict:
        to = _text(params, "to") or self._default_to
        if to is None:
            raise CallError("to required")
        mode = _text(params, "mode")
        call_id = await self._manager.initiate(
            to,
            message,
            mode if mode in ("notify", "conversation") else None,
            _text(params, "sessionKey"),
            options=_options(params),
        )
        return {"callId": call_id, "initiated": True}

    def _call_and_message(self, params: Mapping[str, Any]) -> tuple[str, str]:
        call_id, message = _text(params, "callId"), _text(params, "message")
        if call_id is None or message is None:
            raise CallError("callId and message required")
        return call_id, message

    async def continue_(self, params: Mapping[str, Any]) -> dict:
        call_id, _ = self._call_and_message(params)
        _input(params)
        return await self._routed(call_id, "voicecall.continue", params)

    async def speak(self, params: Mapping[str, Any]) -> dict:
        call_id, _ = self._call_and_message(params)
        return await self._routed(call_id, "voicecall.speak", params)

    async def end(self, params: Mapping[str, Any]) -> dict:
        call_id = _text(params, "callId")
        if call_id is None:
            raise CallError("callId required")
        _text(params, "message")
        return await self._routed(call_id, "voicecall.end", params)

    def _call_and_digits(self, params: Mapping[str, Any]) -> tuple[str, str]:
        call_id, digits = _text(params, "callId"), _text(params, "digits")
        if call_id is None or digits is None:
            raise CallError("callId and digits required")
        return call_id, digits

    async def dtmf(self, params: Mapping[str, Any]) -> dict:
        call_id, _ = self._call_and_digits(params)
        return await self._routed(call_id, "voicecall.dtmf", params)

    def _call_and_target(self, params: Mapping[str, Any]) -> tuple[str, str, str | None]:
        call_id, to, message = _text(params, "callId"), _text(params, "to"), _text(params, "message")
        if call_id is None or to is None:
            raise CallError("callId and to required")
        return call_id, to, message

    async def transfer(self, params: Mapping[str, Any]) -> dict:
        call_id, _, _ = self._call_and_target(params)
        return await self._routed(call_id, "voicecall.transfer", params)

    async def _continue_here(self, params: Mapping[str, Any]) -> dict:
        call_id, message = self._call_and_message(params)
        answer = await self._manager.continue_turn(call_id, message, _input(params))
        result = {"success": True, "transcript": answer.text}
        if answer.input != "speech":
            result["input"] = answer.input  # the person answered with keys
        return result

    async def _speak_here(self, params: Mapping[str, Any]) -> dict:
        call_id, message = self._call_and_message(params)
        await self._manager.speak(call_id, message)
        return {"success": True}

    async def _end_here(self, params: Mapping[str, Any]) -> dict:
        await self._manager.end_call(_text(params, "callId") or "", message=_text(params, "message"))
        return {"success": True}

    async def _dtmf_here(self, params: Mapping[str, Any]) -> dict:
        await self._manager.send_dtmf(*self._call_and_digits(params))
        return {"success": True}

    async def _transfer_here(self, params: Mapping[str, Any]) -> dict:
        await self._manager.transfer(*self._call_and_target(params))
        return {"success": True}

    def _here(self, method: str) -> Callable[[Mapping[str, Any]], Awaitable[dict]]:
        """The commands on a call, run on this node (its owner); in a cluster any node forwards them there."""
        return {
            "voicecall.continue": self._continue_here,
            "voicecall.speak": self._speak_here,
            "voicecall.end": self._end_here,
            "voicecall.dtmf": self._dtmf_here,
            "voicecall.transfer": self._transfer_here,
        }[method]

    async def _routed(self, call_id: str, method: str, params: Mapping[str, Any]) -> dict:
        local = lambda: self._here(method)(params)  # noqa: E731
        if self._route is None:
            return await local()
        return await self._route([call_id], "rpc", {"method": method, "params": dict(params)}, local, _forwarded_result)

    async def serve_forwarded(self, request: dict) -> dict:
        """A command another node forwarded here (the call is ours): run as if asked here; its outcome as JSON."""
        try:
            return {"result": await self._here(request["method"])(request["params"])}
        except CallError as e:
            return {"error": {"code": CALL_ERROR, "message": str(e), "callId": e.call_id}}
        except RpcError as e:
            return {"error": {"code": e.code, "message": str(e), "data": e.data}}
        except CancelledError:
            raise  # its sender gave up (the gateway's connection to that node closed), as a local command's does
        except Exception:
            self._log.failure("a forwarded {method} failed", method=request.get("method"))
            return {"error": {"code": INTERNAL_ERROR, "message": "Internal error"}}

    async def status(self, params: Mapping[str, Any]) -> dict:
        call_id = _text(params, "callId") or _text(params, "sid")
        if call_id is None:
            return {"calls": [c.to_json(with_event_ids=False) for c in self._manager.active_calls()]}
        call = await self._manager.get_call(call_id)
        if call is None:
            return {"found": False}
        return {"found": True, "call": call.to_json(with_event_ids=False)}

    async def cluster(self, params: Mapping[str, Any]) -> dict:
        """The cluster's nodes: id, publicUrl, heartbeat age, alive, the live calls each owns."""
        if self._cluster_nodes is None:
            raise CallError("not a cluster: the store is not PostgreSQL (this node is the only one)")
        return {"nodes": await self._cluster_nodes()}

    async def health(self, params: Mapping[str, Any]) -> dict:
        return {
            "ok": True,
            "provider": self._provider_name,
            "activeCalls": len(self._manager.active_calls()),
            "webhookUrl": self._webhook_url(),
            "uptimeSeconds": round(self._clock.seconds() - self._started_at, 3),
        }


def _forwarded_result(reply: dict) -> Any:
    """The owner's outcome of a forwarded command: its result, or its error raised here."""
    if "result" in reply:
        return reply["result"]
    error = reply.get("error") if isinstance(reply.get("error"), dict) else {}
    message = str(error.get("message") or "the owner node failed the command")
    if error.get("code") == CALL_ERROR:
        raise CallError(message, error.get("callId"))
    raise RpcError(error.get("code") if isinstance(error.get("code"), int) else INTERNAL_ERROR, message, error.get("data"))


#: Requests voicecall may have outstanding to one gateway connection.
MAX_OUTGOING = 256


class GatewayResponders:
    """The connections that registered as the responder; the newest is asked."""

    def __init__(self) -> None:
        self._connections: list["RpcProtocol"] = []

    def register(self, connection: "RpcProtocol") -> None:
        self.unregister(connection)
        self._connections.append(connection)

    def unregister(self, connection: "RpcProtocol") -> None:
        if connection in self._connections:
            self._connections.remove(connection)

    def __len__(self) -> int:
        return len(self._connections)

    def ask(self, call, text: str) -> Deferred | None:
        """Ask the gateway what to say; None when no gateway is registered."""
        if not self._connections:
            return None
        params = {
            "callId": call.call_id,
            # The gateway's agent session the call belongs to (initiate's sessionKey), or null.
            "sessionKey": call.session_key,
            "direction": call.direction.value,
            "from": call.from_number,
            "to": call.to_number,
            "text": text,
            "transcript": [t.to_json() for t in call.transcript],
            # What the call is for (initiate's `objective`), or null.
            "objective": call.metadata.get("objective"),
        }
        d = self._connections[-1].request("voicecall.respond", params)

        def spoken(result):
            if not isinstance(result, dict) or not isinstance(result.get("spoken"), str):
                raise ValueError('the gateway answered voicecall.respond without a string "spoken"')
            return result["spoken"]

        return d.addCallback(spoken)


class GatewayError(Exception):
    """The gateway answered one of our requests with an error object."""


@implementer(IPushProducer)
class RpcProtocol(Protocol):
    """One control connection: newline-delimited JSON-RPC 2.0."""

    _log = Logger()

    def __init__(
        self,
        methods: Mapping[str, Callable],
        subscribe: Callable,
        responders: GatewayResponders | None,
        *,
        clock: IReactorTime,
        limits: RpcLimits,
        budget: LineBudget,
        on_lost: Callable[["RpcProtocol"], None] | None = None,
    ) -> None:
        self._methods = methods
        self._subscribe = subscribe
        self._responders = responders
        self._limits = limits
        self._clock = clock
        self._stall_call: IDelayedCall | None = None
        self._on_lost = on_lost
        self._budget = budget
        self._outgoing: dict[str, Deferred] = {}
        self._next_id = 0
        self._buffer = b""
        self._discarding = False
        self._pending: set[Deferred] = set()
        self._unsubscribe: Callable[[], None] | None = None
        #: The transport paused us: its buffer is full, the peer is not keeping up.
        self._backed_up = False
        #: Upper bound of the bytes the transport holds unsent (see the module docstring).
        self._queued = 0
        self._reading = True
        self._lines_running = False
        self._connected = False

    # -- IPushProducer: the transport tells us when the peer stops reading ---------------------------

    def pauseProducing(self) -> None:
        # The peer stopped reading our answers: stop reading its requests too. `_queued` was set
        # by the write that filled the buffer.
        self._backed_up = True
        if self._stall_call is None and self._connected:
            self._stall_call = self._clock.callLater(self._limits.stall_timeout, self._stalled)
        self._update_reading()

    def resumeProducing(self) -> None:
        # Everything queued has been written.
        self._backed_up = False
        self._queued = 0
        self._cancel_stall()
        self._update_reading()

    def _cancel_stall(self) -> None:
        call, self._stall_call = self._stall_call, None
        if call is not None and call.active():
            call.cancel()

    def _stalled(self) -> None:
        """The peer read nothing of what waits for it for `stall_timeout` seconds."""
        self._stall_call = None
        if self._connected and self._backed_up:
            self._log.warn(
                "closing an RPC connection that does not read: its answers waited {seconds} s",
                seconds=self._limits.stall_timeout,
            )
            self._connected = False
            self.transport.abortConnection()

    def stopProducing(self) -> None:
        self._backed_up = True

    def _update_reading(self) -> None:
        """Read requests only while answers are not backed up and the in-flight cap allows."""
        reading = self._connected and not self._backed_up and len(self._pending) < self._limits.max_in_flight
        if reading != self._reading:
            self._reading = reading
            if reading:
                self.transport.resumeProducing()
                self._run_lines()
            elif self._connected:
                self.transport.pauseProducing()

    def connectionMade(self) -> None:
        self._connected = True
        self.transport.registerProducer(self, True)

    def connectionLost(self, reason) -> None:
        self._connected = False
        self._cancel_stall()
        self._budget.release(self)
        if self._on_lost is not None:
            on_lost, self._on_lost = self._on_lost, None
            on_lost(self)
        if self._responders is not None:
            self._responders.unregister(self)
        outgoing, self._outgoing = self._outgoing, {}
        for d in outgoing.values():
            d.errback(GatewayError("the gateway connection closed"))
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for d in list(self._pending):
            d.cancel()

    # -- framing --------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._connected:
            self._buffer += data
            self._run_lines()

    def _run_lines(self) -> None:
        """Handle the complete lines read so far, while the in-flight cap allows."""
        if self._lines_running:
            return  # a request finished while an earlier line was being handled: that loop goes on
        self._lines_running = True
        try:
            while self._connected and not self._backed_up and len(self._pending) < self._limits.max_in_flight:
                line, sep, rest = self._buffer.partition(b"\n")
                if not sep:
                    break
                self._buffer = rest
                if self._discarding:
                    self._discarding = False
                    continue
                if len(line) > MAX_LINE_BYTES:
                    self._send_error(None, INVALID_REQUEST, "Request line too long (max 1 MiB)")
                    continue
                if line.strip():
                    self._line(line)
        finally:
            self._lines_running = False
        if self._connected and b"\n" not in self._buffer and len(self._buffer) > MAX_LINE_BYTES:
            self._buffer = b""
            if not self._discarding:
                self._discarding = True
                self._send_error(None, INVALID_REQUEST, "Request line too long (max 1 MiB)")
        if self._connected and not self._budget.charge(self, len(self._buffer)):
            self._log.warn(
                "closing an RPC connection: the request data all connections hold would pass {limit} bytes",
                limit=self._budget.limit,
            )
            self._connected = False
            self._buffer = b""
            self._budget.release(self)
            self.transport.abortConnection()
            return
        self._update_reading()

    def _line(self, line: bytes) -> None:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            self._send_error(None, PARSE_ERROR, "Parse error")
            return
        if not isinstance(request, dict):
            self._send_error(None, INVALID_REQUEST, "Invalid Request: expected one JSON object per line")
            return
        rid = request.get("id")
        if "method" not in request and ("result" in request or "error" in request):
            self._answer_received(rid, request)
            return
        if (
            request.get("jsonrpc") != "2.0"
            or not isinstance(request.get("method"), str)
            or not (rid is None or isinstance(rid, (str, int)) and not isinstance(rid, bool))
        ):
            self._send_error(rid if isinstance(rid, (str, int)) else None, INVALID_REQUEST, "Invalid Request")
            return
        params = request.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            self._send_error(rid, INVALID_PARAMS, "Invalid params: expected an object")
            return
        method = request["method"]
        if method == "voicecall.responder.register" and self._responders is not None:
            self._responders.register(self)
            self._send_result(rid, {"registered": True})
            return
        if method == "voicecall.subscribe":
            self._start_subscription()
            self._send_result(rid, {"subscribed": True})
            return
        handler = self._methods.get(method)
        if handler is None:
            self._send_error(rid, METHOD_NOT_FOUND, f"Method not found: {method}")
            return
        d = Deferred.fromCoroutine(handler(params))
        d.addCallbacks(lambda result: self._send_result(rid, result), lambda f: self._failed(rid, method, f))
        d.addErrback(lambda f: self._log.failure("could not answer an RPC request", f))
        if not d.called:
            self._pending.add(d)
            d.addBoth(self._done, d)
            self._update_reading()

    def _done(self, result, d: Deferred):
        """A request finished (and its answer is written): the next may be read."""
        self._pending.discard(d)
        if not self._reading:
            self._update_reading()
        return result

    def _failed(self, rid, method: str, failure) -> None:
        error = failure.value
        if isinstance(error, CallError):
            data = {"callId": error.call_id} if error.call_id else None
            self._send_error(rid, CALL_ERROR, str(error), data)
        elif isinstance(error, RpcError):
            self._send_error(rid, error.code, str(error), error.data)
        elif failure.check(CancelledError):
            return
        else:
            self._log.failure("RPC method {method} failed", failure, method=method)
            self._send_error(rid, INTERNAL_ERROR, "Internal error")

    # -- requests to the peer (a gateway registered as the responder) ----------------------------

    def request(self, method: str, params: dict) -> Deferred:
        if not self._connected:
            return _failed(GatewayError("the gateway connection is closed"))
        if len(self._outgoing) >= MAX_OUTGOING:
            return _failed(GatewayError("too many requests outstanding to the gateway"))
        self._next_id += 1
        rid = f"vc-{self._next_id}"
        d: Deferred = Deferred(lambda _: self._outgoing.pop(rid, None))
        self._outgoing[rid] = d
        self._write({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        return d

    def _answer_received(self, rid, message: dict) -> None:
        d = self._outgoing.pop(rid, None) if isinstance(rid, str) else None
        if d is None:
            return
        if "error" in message:
            error = message["error"] if isinstance(message["error"], dict) else {}
            d.errback(GatewayError(str(error.get("message", "the gateway answered with an error"))))
        else:
            d.callback(message.get("result"))

    # -- subscriptions --------------------------------------------------------------------------

    def _start_subscription(self) -> None:
        if self._unsubscribe is None:
            self._unsubscribe = self._subscribe(self._notify)

    def _notify(self, entry: dict) -> None:
        self._write({"jsonrpc": "2.0", "method": "voicecall.event", "params": entry})

    # -- output ---------------------------------------------------------------------------------

    def _send_result(self, rid, result) -> None:
        if rid is not None:
            self._write({"jsonrpc": "2.0", "id": rid, "result": result})

    def _send_error(self, rid, code: int, message: str, data: Any = None) -> None:
        error: dict[str, Any] = {"code": code, "message": message}
        if data is not None:
            error["data"] = data
        self._write({"jsonrpc": "2.0", "id": rid, "error": error})

    def _write(self, message: dict) -> None:
        if not self._connected:
            return
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        # Until the transport pauses us its buffer holds at most its bufferSize.
        queued = (self._queued if self._backed_up else getattr(self.transport, "bufferSize", 0)) + len(data)
        if queued > self._limits.max_queued_bytes:
            self._drop(queued)
            return
        self._queued = queued
        self.transport.write(data)

    def _drop(self, queued: int) -> None:
        """Close a connection whose peer does not read what it is sent."""
        self._log.warn(
            "closing an RPC connection that does not read: {queued} bytes would be queued for it (max {limit})",
            queued=queued,
            limit=self._limits.max_queued_bytes,
        )
        self._connected = False
        self.transport.abortConnection()


def _failed(error: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(error)
    return d


class RpcFactory(Factory):
    noisy = False
    _log = Logger()

    def __init__(
        self,
        methods: Mapping[str, Callable],
        subscribe: Callable,
        responders: GatewayResponders | None = None,
        *,
        clock: IReactorTime,
        limits: RpcLimits = RpcLimits(),
    ) -> None:
        self._methods = methods
        self._subscribe = subscribe
        self._responders = responders
        self._clock = clock
        self._limits = limits
        self._connections: set[RpcProtocol] = set()
        self._budget = LineBudget(limits.max_shared_buffer)
        self._refused = 0

    def __repr__(self) -> str:
        return f"<RpcFactory {len(self._methods)} methods>"

    def buildProtocol(self, addr) -> RpcProtocol | None:
        """A protocol for a new connection; None (closed at once) when MAX_CONNECTIONS are open."""
        if len(self._connections) >= self._limits.max_connections:
            if not self._refused:
                self._log.warn("refusing RPC connections: {limit} are open", limit=self._limits.max_connections)
            self._refused += 1
            return None
        if self._refused:
            self._log.info("accepting RPC connections again ({count} refused)", count=self._refused)
            self._refused = 0
        protocol = RpcProtocol(
            self._methods, self._subscribe, self._responders, clock=self._clock, limits=self._limits, on_lost=self._connections.discard, budget=self._budget
        )
        self._connections.add(protocol)
        return protocol
