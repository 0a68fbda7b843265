# -*- test-case-name: tests.test_streaming -*-
"""
Where a Twilio media stream meets the call: the bridge is the media server's `StreamHandler`
and, for the manager, the `Voice` of a Twilio call.

- The Twilio adapter asks it for a call's stream TwiML: a `<Connect><Stream>` to our stream URL
  with a one-time token in a `<Parameter>` (SPEC §7.1.3), minted for each fetch (DESIGN.md
  threat model: the token, not the upgrade's X-Twilio-Signature, which is the same for every
  stream, authenticates a stream). A token starts one stream: a `start` is accepted only for a
  live call whose latest unused token it presents (compared in constant time) within
  `STREAM_TOKEN_TTL_SECONDS`, and using it retires it; a second socket presenting it is
  refused (1008) and the first keeps the call. A newer fetch retires the call's unused token.
  Tokens are kept as SHA-256 digests, never logged, never in a repr.
- A fetch whose verified request key the call has already processed (a replay the replay cache
  no longer knows: after a restart, or after its 10 minutes) gets empty TwiML and no token.
- The stream TwiML's `<Redirect>` after `</Connect>` (its resume URL built by the adapter) leads
  back to the daemon when the socket closes: a reconnect is a fresh signed fetch with a fresh
  token. That resume fetch gets a fresh stream for a call that is live here (after a restart, the
  call restored from the store: its transcript and turn state are the stored ones; without a
  restart a `continue` waiting for its answer still gets it from the new stream), `<Hangup/>` for
  a call that is over or unknown here (no token), and, while the daemon stops, a Redirect back a
  second later (its successor answers it; the port is held across the restart, see systemd/).
- The caller's audio goes to a realtime speech-to-text session; its final transcripts become
  `call.speech` events (stream-native turns, DESIGN.md: no turn token, no TwiML update), and
  speech starting clears our playback (barge-in) except while an outbound call's first words
  are still playing (SPEC §6.2 [H]).
- The initial message is spoken when the speech-to-text session is ready (SPEC §5.3 [H]).
- Speaking on a streamed call synthesises with TTS and plays paced audio into the stream; it never
  falls back to `<Say>` while a stream is up (SPEC §20 item 10). Calls without a stream use the
  adapter's own speech.
- A dropped stream ends its call only if no new stream arrives within 2 s (SPEC §10.2 [H]): the
  time for Twilio to follow the resume Redirect and open the new stream with its new token.
"""
from __future__ import annotations

import hashlib
import hmac
import uuid
from typing import Any, Callable

from attrs import define, field
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from voicecall.domain.model import CallEvent, CallRecord, CallState, Direction, EventType, Mode
from voicecall.providers import twiml
from voicecall.providers.twilio import stream_token

RECONNECT_GRACE_SECONDS = 2.0
#: How long a minted stream token can start a stream (Twilio connects within a second or two).
STREAM_TOKEN_TTL_SECONDS = 60.0
STREAM_TTS_UNAVAILABLE = "Telephony TTS unavailable while media stream is active; refusing TwiML fallback"
#: Per-call state kept for calls (tokens, timers) is capped like any map outside input can grow.
MAX_CALLS = 10_000


def _bounded_put(mapping: dict, key: str, value: Any) -> None:
    mapping.pop(key, None)
    mapping[key] = value
    while len(mapping) > MAX_CALLS:
        del mapping[next(iter(mapping))]


@define(repr=False)
class StreamBridge:
    _clock: IReactorTime
    _fallback: Any  # the Twilio adapter: its own speech for calls without a stream
    _synthesize: Callable[[str, Callable], Deferred] | None  # TelephonyTts.synthesize
    _new_transcriber: Callable[..., Any]  # (on_partial, on_final, on_speech_start) -> RealtimeTranscriber
    _stream_path: str
    _public_url: Callable[[], "str | None"]
    #: The CallManager, built after the bridge (the bridge is its voice): reached through this
    #: callable, which is called only when carrier traffic arrives, never while building.
    _manager: Callable[[], Any]
    _max_streams: int = 1
    #: Called with the seconds from a playback request to its first synthesised audio (metrics).
    _on_first_audio: Callable[[float], None] | None = None
    _stopped: bool = field(default=False, init=False)
    # CallSid -> (SHA-256 of the unused stream token, when it expires), oldest mint first.
    _tokens: dict[str, tuple[bytes, float]] = field(factory=dict, repr=False)
    _sessions: dict[str, Any] = field(factory=dict, repr=False)  # CallSid -> StreamSession
    _transcribers: dict[str, Any] = field(factory=dict, repr=False)  # StreamSid -> RealtimeTranscriber
    _grace: dict[str, IDelayedCall] = field(factory=dict, repr=False)  # CallSid -> pending end-of-call
    _closing: set = field(factory=set, repr=False)  # STT sessions closing: Deferreds firing when they are gone
    _call_sids: dict[str, str] = field(factory=dict, repr=False)  # callId -> CallSid, for calls that had a stream
    _unsubscribe: Callable[[], None] | None = field(default=None, repr=False)
    _log = Logger()

    # -- the Twilio adapter's hooks ---------------------------------------------------------------

    def stream_url(self) -> str | None:
        public = self._public_url()
        return twiml.stream_url(public, self._stream_path) if public else None

    def stream_twiml(
        self,
        call_sid: str,
        direction: Direction,
        request_key: str | None = None,
        resume_url: str | None = None,
        resuming: bool = False,
    ) -> str | None:
        """
        The `<Connect><Stream>` document for a call with a new one-time token (retiring the
        call's unused one), or None when streaming cannot be used. `request_key` is the fetch's
        verified key: one the call has already processed is a replay, answered with empty TwiML.
        `resume_url` is where Twilio asks again when the stream ends; `resuming` says this fetch
        is such a return, which only a call live here gets a stream for.
        """
        url = self.stream_url()
        if url is None:
            return None
        manager = self._calls()
        if resuming and manager is None:
            # Stopping: the stream closed so that the next process takes over; send Twilio
            # back in a second (on a new connection, queued by the held port until then).
            return twiml.come_back(resume_url) if resume_url else twiml.empty()
        call = manager.find(call_sid) if manager is not None else None
        if resuming and (call is None or call.is_terminal):
            self._log.info("Stream resume for {sid}: the call is not live here; hanging up", sid=call_sid)
            return twiml.hangup()
        if call is not None and request_key and request_key in call.processed_event_ids:
            self._log.warn("Replayed TwiML fetch for {sid}: no stream token minted", sid=call_sid)
            return twiml.empty()
        now = self._clock.seconds()
        for sid, (_, expires) in list(self._tokens.items()):
            if expires > now:
                break  # minted in order, so the rest are younger
            del self._tokens[sid]
        token = stream_token()
        _bounded_put(self._tokens, call_sid, (_digest(token), now + STREAM_TOKEN_TTL_SECONDS))
        return twiml.stream(url, token, resume_url)

    def stream_busy(self) -> bool:
        """An inbound caller waits in the hold queue while every stream slot is taken."""
        return len(self._sessions) >= self._max_streams

    def forget(self, call_sid: str) -> None:
        """The call is over: drop its unused token."""
        self._tokens.pop(call_sid, None)

    def stop(self) -> Deferred:
        """
        The daemon is stopping: no call is ended for its stream, no STT session is left open.
        Fires once every STT session closed so far is gone (each close is bounded by its
        close-handshake timeout).
        """
        self._stopped = True
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()
        for timer in self._grace.values():
            if timer.active():
                timer.cancel()
        self._grace.clear()
        for stt in self._transcribers.values():
            self._close_stt(stt)
        self._transcribers.clear()
        self._sessions.clear()
        return DeferredList(list(self._closing), consumeErrors=True)

    def _close_stt(self, stt) -> None:
        closing = stt.close()
        self._closing.add(closing)
        closing.addErrback(lambda f: None)
        closing.addBoth(lambda _: self._closing.discard(closing))

    # -- StreamHandler ----------------------------------------------------------------------------

    def accept_start(self, call_sid: str, token: str | None) -> bool:
        """
        Whether `token` is the call's unused, unexpired stream token; if it is, it is used up.
        A wrong token leaves the right one usable (Twilio's own start may still come).
        """
        entry = self._tokens.get(call_sid)
        manager = self._calls()
        call = manager.find(call_sid) if manager is not None else None
        if call is None or entry is None or token is None:
            self._log.warn("Rejecting media stream: unknown call, or no unused token, for {sid}", sid=call_sid)
            return False
        digest, expires = entry
        if not hmac.compare_digest(digest, _digest(token)):
            self._log.warn("Rejecting media stream: invalid token for {sid}", sid=call_sid)
            return False
        del self._tokens[call_sid]
        if self._clock.seconds() >= expires:
            self._log.warn("Rejecting media stream: expired token for {sid}", sid=call_sid)
            return False
        return True

    def stream_started(self, session) -> None:
        sid = session.call_sid
        timer = self._grace.pop(sid, None)
        if timer is not None and timer.active():
            timer.cancel()
        old = self._sessions.get(sid)
        if old is not None and old is not session:
            old.close(1000, "Replaced by a new stream")
        self._sessions[sid] = session
        self._watch_call_end(sid)
        stt = self._new_transcriber(
            on_partial=lambda text: None,
            on_final=lambda text: self._final(sid, text),
            on_speech_start=lambda: self._speech_started(sid),
        )
        self._transcribers[session.stream_sid] = stt
        d = stt.connect()
        d.addErrback(lambda f: self._log.warn("Realtime STT for {sid} did not connect: {error}", sid=sid, error=f.getErrorMessage()))
        # SPEC §5.3 [H]: the first words go out when speech-to-text is ready (or has failed: TTS still works).
        d.addBoth(lambda _: self._speak_initial(sid, session))

    def _watch_call_end(self, call_sid: str) -> None:
        """Hear of the call's end (the manager's call.ended), to close its stream then."""
        manager = self._calls()
        if manager is None:
            return
        if self._unsubscribe is None:
            self._unsubscribe = manager.subscribe(self._call_event)
        call = manager.find(call_sid)
        if call is not None:
            _bounded_put(self._call_sids, call.call_id, call_sid)

    def _call_event(self, entry: dict) -> None:
        """
        A call that had a stream ended: its token is dropped and its stream closed 1000 (Twilio
        closes it too; a peer that kept the socket would keep the session, its STT session and
        a stream slot).
        """
        if entry.get("type") != "call.ended":
            return
        sid = self._call_sids.pop(entry.get("callId"), None)
        if sid is None:
            return
        self.forget(sid)
        session = self._sessions.get(sid)
        if session is not None:
            self._log.info("closing the media stream of {call_id}: the call ended", call_id=entry.get("callId"))
            session.close(1000, "Call ended")

    def _speak_initial(self, call_sid: str, session) -> None:
        manager = self._calls()
        if self._sessions.get(call_sid) is session and manager is not None:
            manager.speak_initial_message(call_sid)

    def media_received(self, session, ulaw: bytes) -> None:
        stt = self._transcribers.get(session.stream_sid)
        if stt is not None:
            stt.send_audio(ulaw)

    def dtmf_received(self, session, digit: str) -> None:
        manager = self._calls()
        if manager is None:
            return
        event = CallEvent(
            type=EventType.DTMF,
            call_id=session.call_sid,
            id=str(uuid.uuid4()),
            timestamp=int(self._clock.seconds() * 1000),
            provider_call_id=session.call_sid,
            digits=digit,
        )
        self._background(manager.process_event(event), "DTMF from the media stream")

    def stream_stopped(self, session) -> None:
        stt = self._transcribers.pop(session.stream_sid, None)
        if stt is not None:
            self._close_stt(stt)
        sid = session.call_sid
        if self._sessions.get(sid) is not session:
            return  # a newer stream took over: nothing ends
        del self._sessions[sid]
        manager = self._calls()
        if manager is None or manager.find(sid) is None:
            self.forget(sid)
            return
        _bounded_put(self._grace, sid, self._clock.callLater(RECONNECT_GRACE_SECONDS, self._grace_over, sid))

    def _grace_over(self, call_sid: str) -> None:
        self._grace.pop(call_sid, None)
        manager = self._calls()
        if call_sid in self._sessions or manager is None:
            return
        call = manager.find(call_sid)
        self.forget(call_sid)
        if call is None:
            return
        self._log.info("media stream of {call_id} did not come back: ending the call", call_id=call.call_id)
        self._background(manager.end_call(call.call_id), "ending a call whose stream dropped")

    # -- speech-to-text callbacks -------------------------------------------------------------------

    def _first_words_playing(self, call_sid: str) -> bool:
        """SPEC §6.2 [H]: an outbound conversation call still speaking its initial message."""
        manager = self._calls()
        call = manager.find(call_sid) if manager is not None else None
        return (
            call is not None
            and call.direction is Direction.OUTBOUND
            and call.state is CallState.SPEAKING
            and bool(call.metadata.get("initialMessage"))
        )

    def _speech_started(self, call_sid: str) -> None:
        if self._first_words_playing(call_sid):
            return
        session = self._sessions.get(call_sid)
        if session is not None and session.playback.is_playing:
            session.playback.clear()

    def _final(self, call_sid: str, text: str) -> None:
        manager = self._calls()
        if manager is None:
            return
        if self._first_words_playing(call_sid):
            self._log.info("Ignoring barge transcript while initial message is still playing")
            return
        session = self._sessions.get(call_sid)
        if session is not None and session.playback.is_playing:
            session.playback.clear()
        event = CallEvent(
            type=EventType.SPEECH,
            call_id=call_sid,
            id=str(uuid.uuid4()),
            timestamp=int(self._clock.seconds() * 1000),
            provider_call_id=call_sid,
            transcript=text,
            is_final=True,
        )
        self._background(manager.process_event(event), "a transcript from the media stream")

    def _calls(self) -> Any:
        """The manager, or None once the daemon is stopping (no call is ended for its stream)."""
        return None if self._stopped else self._manager()

    def _background(self, coroutine, what: str) -> None:
        d = Deferred.fromCoroutine(coroutine)
        d.addErrback(lambda f: self._log.failure("failed: " + what, f))

    # -- Voice ------------------------------------------------------------------------------------

    def _session(self, call: CallRecord):
        return self._sessions.get(call.provider_call_id or "")

    def _play(self, session, text: str, voice: str | None = None) -> Deferred:
        if self._synthesize is None:
            d: Deferred = Deferred()
            d.errback(RuntimeError(STREAM_TTS_UNAVAILABLE))
            return d
        synthesize, observe, started = self._synthesize, self._on_first_audio, self._clock.seconds()

        def run(on_audio):
            if observe is None:
                return synthesize(text, on_audio, voice)
            first = []

            def audio(chunk):
                if not first:
                    first.append(True)
                    observe(self._clock.seconds() - started)
                on_audio(chunk)

            return synthesize(text, audio, voice)

        return session.playback.play(run).addCallback(lambda _: None)

    def speak(self, call: CallRecord, text: str, voice: str | None) -> Deferred:
        session = self._session(call)
        if session is not None:
            # The stream's TTS speaks with the call's own voice, if it chose one (`voice` here is
            # the carrier's <Say> voice otherwise).
            return self._play(session, text, call.metadata.get("voice"))
        return self._fallback.speak(call, text, voice)

    def prompt(self, call: CallRecord, text: str, voice: str | None, turn_token: str | None, dtmf: bool = False) -> Deferred:
        session = self._session(call)
        if session is not None:
            # Stream-native turn: speak; the next final transcript (or key: the stream's dtmf
            # frames always arrive) answers (DESIGN.md).
            return self._play(session, text, call.metadata.get("voice"))
        return self._fallback.prompt(call, text, voice, turn_token, dtmf=dtmf)

    def start_listening(self, call: CallRecord, turn_token: str | None, dtmf: bool = False) -> Deferred:
        if self._session(call) is not None or self._streaming(call):
            return Deferred.fromCoroutine(_nothing())
        return self._fallback.start_listening(call, turn_token, dtmf=dtmf)

    def stop_listening(self, call: CallRecord) -> Deferred:
        if self._session(call) is not None:
            return Deferred.fromCoroutine(_nothing())
        return self._fallback.stop_listening(call)

    def _streaming(self, call: CallRecord) -> bool:
        """
        Whether this call runs over a media stream: it has one, or streaming is usable (a public
        URL is known) and it is not a notify call (whose TwiML says its message and hangs up).
        Decided from configuration, not from the stream's arrival, which races the answer.
        """
        return self._session(call) is not None or (call.mode is not Mode.NOTIFY and self.stream_url() is not None)

    def wants_turn_token(self, call: CallRecord) -> bool:
        return not self._streaming(call) and self._fallback.wants_turn_token(call)

    def defers_initial_message(self, call: CallRecord) -> bool:
        """A streamed call speaks its first words once the stream is up, not on answer."""
        return self._streaming(call)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


async def _nothing() -> None:
    return None
