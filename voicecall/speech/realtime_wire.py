# -*- test-case-name: tests.test_stt -*-
"""
The realtime transcription client's wire: the autobahn WebSocket client protocol and factory of
one L{voicecall.speech.stt.RealtimeTranscriber} (its L{TranscriberEnd}), which holds the policy
(session, reconnects, utterances).

Performance: the appends (one every 100 ms per call) are framed here, not by autobahn, whose
client send path (C{sendMessage}, C{sendFrame}, its masker, C{sendData}) cost more than the rest
of the forwarding: each is one masked text frame (L{voicecall.infra.private.ws.masked_text_frame},
with a fresh 4-byte key from C{os.urandom} per frame) written straight to the socket when nothing
is queued before it (L{voicecall.infra.private.ws.Wire.send}, as the media-stream server does for
its own frames). autobahn still does the handshake, the session update, control frames and
closing, and every send it would queue itself (its send queue in use, compression negotiated, or
its private names missing: L{voicecall.infra.private.ws}).

The API key is never logged: autobahn logs the whole opening handshake at debug level, so the
protocol's autobahn logger is pinned at info.
"""
from __future__ import annotations

import os
from typing import Any, Protocol

import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from voicecall import __version__
from voicecall.infra.private.ws import Wire, masked_text_frame, tune_factory

__all__ = ["RealtimeClientFactory", "RealtimeConnection", "TranscriberEnd"]

_OPEN = WebSocketProtocol.STATE_OPEN
_NO_LIMIT = 1 << 62


class TranscriberEnd(Protocol):
    """What a connection reports to its transcriber."""

    def session_update(self) -> bytes:
        """The first message of every session (sent by autobahn once the socket opens)."""

    def event_received(self, connection: RealtimeConnection, payload: bytes) -> None:
        """A text message from the server."""

    def connection_closed(self, connection: RealtimeConnection, was_clean: bool, code: int | None, reason: str | None) -> None:
        """The connection closed (or never opened)."""


@implementer(IPushProducer)
class RealtimeConnection(WebSocketClientProtocol):
    """
    One WebSocket connection of a transcriber. It reports its opening (through C{opened}), its
    messages and its closing to the transcriber, and registers itself as the transport's push
    producer so that audio is dropped, not queued, while the transport's buffer is full.
    """

    # autobahn's logger (it owns `log`): pinned at info, so its debug dump of the opening
    # handshake (which carries the Authorization header) is never emitted, whatever the
    # global txaio level.
    log = txaio.make_logger(level="info")
    _log = Logger()

    _wire: Wire
    paused = False

    def __init__(self, factory: RealtimeClientFactory, end: TranscriberEnd) -> None:
        super().__init__()
        self.factory = factory
        self._end = end
        #: Fires with this connection once the session update is sent; cancelling it drops the connection.
        self.opened: Deferred[RealtimeConnection] = Deferred(self._cancel_open)

    def connectionMade(self) -> None:
        super().connectionMade()
        self._wire = Wire(self)

    def _cancel_open(self, d: Deferred[Any]) -> None:
        self.dropConnection(abort=True)

    def onOpen(self) -> None:
        try:
            self.sendMessage(self._end.session_update(), False)
            self.registerProducer(self, True)
            self.opened.callback(self)
        except Exception:
            self._log.failure("Realtime STT: opening the session failed")
            self.dropConnection(abort=True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            return
        try:
            self._end.event_received(self, payload)
        except Exception:
            self._log.failure("Realtime STT: handling a server event failed")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        try:
            self._end.connection_closed(self, wasClean, code, reason)
        except Exception:
            self._log.failure("Realtime STT: handling the connection close failed")

    def upgrade_refusal(self) -> tuple[int, str] | None:
        """The HTTP status and reason the server answered the upgrade with, if not 101."""
        status_line = getattr(self, "http_status_line", None)
        parts = status_line.split(None, 2) if status_line else []
        if len(parts) >= 2 and parts[1].isdigit() and parts[1] != "101":
            return int(parts[1]), parts[2] if len(parts) > 2 else ""
        return None

    @property
    def drop_reason(self) -> str | None:
        """Why autobahn dropped the connection uncleanly, if it says."""
        return getattr(self, "wasNotCleanReason", None)

    def send_text(self, payload: bytes) -> bool:
        """
        Send `payload` (UTF-8 JSON) as one masked text frame; False if the connection is not
        open. What autobahn would queue rather than write goes through C{sendMessage}, so
        frames never overtake each other. With nothing waiting in a plain TCP transport the
        frame goes to the kernel now; otherwise to the transport, whose buffer filling up
        pauses this producer as before.
        """
        if self.state != _OPEN:
            return False
        if not self._wire.can_frame():
            self.sendMessage(payload, False)
            return True
        # The transport's own buffer bound pauses this producer; no other limit applies here.
        self._wire.send(masked_text_frame(payload, os.urandom(4)), _NO_LIMIT)
        return True

    # IPushProducer: the transport's buffer is full (or drained again).
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True


class RealtimeClientFactory(WebSocketClientFactory):
    """The client factory of one transcriber: URL, headers and protocol options."""

    # Twisted logs every factory start and stop otherwise: one pair per connection.
    noisy = False

    def __init__(self, end: TranscriberEnd, url: str, headers: dict[str, str], reactor: Any, max_message_bytes: int):
        super().__init__(url, headers=headers, useragent=f"voicecall/{__version__}", reactor=reactor)
        self._end = end
        self.setProtocolOptions(
            # The transcriber's own timeout (on the injected clock) bounds the whole connection attempt.
            openHandshakeTimeout=0,
            maxFramePayloadSize=max_message_bytes,
            maxMessagePayloadSize=max_message_bytes,
            # Every message is parsed as JSON, which rejects invalid UTF-8 anyway.
            utf8validateIncoming=False,
        )
        tune_factory(self, reactor)

    def buildProtocol(self, addr: Any) -> RealtimeConnection:
        """Each connection is built with its factory and its transcriber (Twisted's buildProtocol, overridden)."""
        return RealtimeConnection(self, self._end)
