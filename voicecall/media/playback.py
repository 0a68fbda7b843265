# -*- test-case-name: tests.test_playback -*-
"""
Paced outbound TTS playback on Twilio media streams (SPEC §10.5 [H]).

Every stream has a L{Playback}: a FIFO of utterances, one playing at a time. Playing one means
starting its synthesis, sending a 160-byte mu-law silence frame every 20 ms until audio is
buffered (the stream stays warm), converting the audio chunks as they arrive (16-bit PCM at
any rate through L{PcmToUlaw}, 8 kHz mu-law as it is), cutting them into 20 ms frames and
sending one frame per tick; then a mark, and the utterance completes when Twilio echoes it.

All streams share one L{PlaybackScheduler}: a single timer on an absolute grid (points at
origin + n x 2.5 ms; sleep until the next), so lateness never accumulates. Each stream is served
on one of the eight phases of the 20 ms period, so it sends one frame every 20 ms while the
streams' sends are spread over eight smaller bursts instead of one (with 500 streams, a single
burst delays the last stream's frame by the time it takes to send all of them). Each tick
visits only the playbacks of its phase that have something to send (a frame or a keep-alive)
and sends at most one frame for each; a playback waiting for its mark echo, or idle, is not
visited, and with nothing to play the scheduler has no timer at all. Synthesis deadlines are
checked on those same ticks, so N playing streams cost one timer, not N; only a mark wait has a
timer of its own.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Callable, Protocol

from attrs import define, field
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from voicecall.infra.audio import FRAME_BYTES, SAMPLE_RATE, SILENCE_FRAME, AudioChunk, Framer, PcmToUlaw

__all__ = [
    "MAX_PENDING",
    "Playback",
    "PlaybackError",
    "PlaybackScheduler",
    "StreamSink",
    "Synthesize",
]

#: Utterances a stream may hold, the playing one included (SPEC §10.5 [H]).
MAX_PENDING = 8
#: Interval of the shared tick and duration of one frame, in seconds.
FRAME_SECONDS = FRAME_BYTES / SAMPLE_RATE
#: Default bound on one synthesis, in seconds (the TTS request timeout, SPEC §12.2).
SYNTHESIS_TIMEOUT = 30.0
#: Time allowed for the mark echo beyond the audio's own duration, in seconds.
MARK_MARGIN = 5.0
#: Points of the shared tick within one 20 ms period (a 2.5 ms grid). Eight smaller bursts
#: instead of four put the p99 pacing error of 500 streams with STT at 4-9 ms rather than 6-8 ms
#: (benchmarks/media_streams.py); the extra wake-ups cost nothing measurable.
PHASES = 8
#: After a stall, frames a stream may send at once to get back on its grid (100 ms of audio).
CATCHUP_PERIODS = 5
#: Frames one utterance may buffer ahead of the pacing (10 minutes of audio, 4.8 MB).
MAX_BUFFERED_FRAMES = 30_000

QUEUE_FULL = "Telephony TTS queue is full for stream; maxPending={}"
NO_AUDIO = "Telephony TTS produced no audio"
TIMED_OUT = "Telephony TTS synthesis timed out after {}ms"
NOT_DELIVERED = "Telephony stream playback failed: audio chunk {} not delivered"
MARK_NOT_DELIVERED = "Telephony stream playback failed: mark not delivered"
STREAM_CLOSED = "Telephony stream playback failed: stream closed"
TOO_MUCH_AUDIO = "Telephony TTS produced more audio than one utterance may buffer"

#: synthesize(on_chunk) -> Deferred that fires when synthesis is complete. `on_chunk` takes
#: each L{AudioChunk} as it arrives; cancelling the Deferred must abort the synthesis.
Synthesize = Callable[[Callable[[AudioChunk], None]], Deferred]


class PlaybackError(Exception):
    """An utterance failed; the message is the SPEC §10.5 text."""


class StreamSink(Protocol):
    """Where a playback's messages go (the stream session); each returns whether it was sent."""

    def send_media(self, frame: bytes) -> bool: ...

    def send_mark(self, name: str) -> bool: ...

    def send_clear(self) -> bool: ...


class PlaybackScheduler:
    """
    The one shared tick that paces every stream's playback.

    The 20 ms period is cut into C{phases} evenly spaced points (C{PHASES} by default: a 2.5 ms step).
    Each playback is given one phase when it becomes active (the least busy one; among equals,
    the one due soonest) and is visited on that phase's points only, so it still sends exactly
    one frame every 20 ms, while the streams' frames go out in C{phases} smaller bursts rather
    than one burst of every stream at once. Still one C{callLater} chain for all: the timer
    fires only at points whose phase has playbacks, and stops when no playback has anything
    to send.

    The points lie on an absolute grid (origin + n x step, the origin fixed when the tick
    starts), and the delay to the next one is measured from the clock, so a late tick does not
    push the following ones back. A late tick serves every point that has come, so a stream
    delayed by a stall sends the frames it owes at once and is back on its grid (Twilio buffers
    what it is sent); a stall of more than C{CATCHUP_PERIODS} periods is not made up beyond that:
    the older points are skipped (the stream's audio then runs that much later) and the periods
    so lost are counted in C{missed_ticks}.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, interval: float = FRAME_SECONDS, phases: int = PHASES) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        if phases < 1:
            raise ValueError("phases must be at least 1")
        self.clock = clock
        self.interval = interval
        self.phases = phases
        self._step = interval / phases
        self._members: list[dict[Playback, None]] = [{} for _ in range(phases)]
        self._phase_of: dict[Playback, int] = {}
        self._call: IDelayedCall | None = None
        self._origin = 0.0
        #: Index (from the origin) of the first grid point not served yet, and of the point the
        #: timer is set for (the first from there whose phase has playbacks); phase = index % phases.
        self._served = 0
        self._next = 0
        self._ticking = False
        #: Timer firings so far, whole periods skipped because a tick was that late, and the
        #: greatest lateness of a tick behind its point (seconds): for benchmarks.
        self.ticks = 0
        self.missed_ticks = 0
        self.max_lateness = 0.0

    @property
    def active_count(self) -> int:
        """How many playbacks the tick visits."""
        return len(self._phase_of)

    @property
    def running(self) -> bool:
        """Whether the tick is scheduled."""
        return self._call is not None

    def phase_of(self, playback: Playback) -> int | None:
        """The phase `playback` is served on, or None when it is not active."""
        return self._phase_of.get(playback)

    def activate(self, playback: Playback) -> None:
        """Visit `playback` on every point of its phase from the next one until it has nothing to send."""
        if playback in self._phase_of:
            return
        if self._call is None and not self._ticking:
            # Idle: start a fresh grid now, and serve this playback at once (phase 0).
            self._origin = self.clock.seconds()
            self._served = self._next = 0
            self._join(playback, 0)
            self._call = self.clock.callLater(0, self._tick)
            return
        phases, members = self.phases, self._members
        # The first point not served yet and not already past.
        first = max(self._served, math.ceil((self.clock.seconds() - self._origin) / self._step - 1e-6))
        # The least busy phase; among equals, the one whose next point comes first.
        phase = min(range(phases), key=lambda p: (len(members[p]), (p - first) % phases))
        self._join(playback, phase)
        if not self._ticking and self._call is not None:
            index = first + (phase - first) % phases
            if index < self._next:
                # The timer was set for a later point (the phases between were empty).
                self._call.cancel()
                self._call = None
                self._schedule(index)

    def deactivate(self, playback: Playback) -> None:
        """Stop visiting `playback`; with nothing left to visit, stop the tick."""
        phase = self._phase_of.pop(playback, None)
        if phase is not None:
            self._members[phase].pop(playback, None)
        if not self._phase_of and self._call is not None and not self._ticking:
            self._call.cancel()
            self._call = None

    def _join(self, playback: Playback, phase: int) -> None:
        self._phase_of[playback] = phase
        self._members[phase][playback] = None

    def _schedule(self, index: int) -> None:
        """Set the timer for the first point from `index` on whose phase has playbacks."""
        phases, members = self.phases, self._members
        for _ in range(phases):
            if members[index % phases]:
                break
            index += 1
        self._next = index
        self._call = self.clock.callLater(max(0.0, self._origin + index * self._step - self.clock.seconds()), self._tick)

    def _tick(self) -> None:
        self._call = None
        phases, step = self.phases, self._step
        now = self.clock.seconds()
        index = self._next
        lateness = now - (self._origin + index * step)
        if lateness > self.max_lateness:
            self.max_lateness = lateness
        # Points due now: this one, and those the lateness ran past (1e-9: float grid sums).
        due = max(1, int((lateness + 1e-9) // step) + 1)
        limit = phases * CATCHUP_PERIODS
        if due > limit:
            skipped = due - limit
            self.missed_ticks += (skipped + phases - 1) // phases
            index += skipped
            due = limit
        self.ticks += 1
        self._ticking = True
        try:
            for i in range(index, index + due):
                self._serve(i % phases, now)
        finally:
            self._ticking = False
        self._served = index + due
        if self._phase_of:
            self._schedule(self._served)

    def _serve(self, phase: int, now: float) -> None:
        members, phase_of = self._members[phase], self._phase_of
        for playback in tuple(members):
            try:
                keep = playback._on_tick(now)
            except Exception:
                self._log.failure("playback tick failed; dropping the stream from the tick")
                keep = False
            if not keep and phase_of.get(playback) == phase:
                del phase_of[playback]
                members.pop(playback, None)


@define(eq=False, repr=False)
class _Entry:
    """One queued utterance and its progress."""

    synthesize: Synthesize
    result: Deferred
    synthesis: Deferred | None = None
    deadline: float = 0.0
    converter: PcmToUlaw | None = None
    format: tuple[str, int] | None = None
    framer: Framer = field(factory=Framer)
    frames: deque = field(factory=deque)
    produced: int = 0  # frames of audio made so far
    sent: int = 0  # frames of audio handed to the sink
    first_sent_at: float | None = None
    synthesized: bool = False
    mark: str | None = None
    mark_timer: IDelayedCall | None = None


@define(eq=False, repr=False)
class Playback:
    """
    One stream's utterance queue. Created by the media-stream server for each accepted stream.
    """

    _scheduler: PlaybackScheduler
    _sink: StreamSink
    _synthesis_timeout: float = SYNTHESIS_TIMEOUT
    _max_pending: int = MAX_PENDING
    _queue: deque = field(init=False, factory=deque)
    _active: _Entry | None = field(init=False, default=None)
    _seq: int = field(init=False, default=0)
    _closed: bool = field(init=False, default=False)
    _log = Logger()

    @property
    def is_playing(self) -> bool:
        """Whether an utterance is under way (synthesising, sending, or awaiting its mark)."""
        return self._active is not None

    @property
    def pending(self) -> int:
        """Utterances not finished yet, the playing one included."""
        return len(self._queue) + (self._active is not None)

    def play(self, synthesize: Synthesize) -> Deferred:
        """
        Queue an utterance. The Deferred fires with C{"played"} once Twilio echoed the mark
        sent after its audio, or C{"skipped"} if L{clear} (barge-in) or the end of the stream
        dropped it; it fails with L{PlaybackError} (or the synthesis error) otherwise.
        Cancelling it drops the utterance (with a C{clear} if its audio had started).
        """
        if self._closed:
            return fail(PlaybackError(STREAM_CLOSED))
        if self.pending >= self._max_pending:
            return fail(PlaybackError(QUEUE_FULL.format(self._max_pending)))
        entry = _Entry(synthesize=synthesize, result=Deferred(lambda d: self._cancelled(entry)))
        self._queue.append(entry)
        self._pump()
        return entry.result

    def clear(self) -> None:
        """
        Barge-in: queued utterances resolve "skipped", the playing one is aborted (its
        synthesis cancelled) and resolves "skipped", and Twilio is told to drop buffered audio.
        Marks echoed afterwards are ignored. New utterances can be queued at once.
        """
        dropped = self._drop_all()
        self._sink.send_clear()
        for entry in dropped:
            entry.result.callback("skipped")

    def close(self) -> None:
        """
        The stream ended: everything resolves "skipped" (nothing is sent) and later
        utterances fail with C{"Telephony stream playback failed: stream closed"}.
        """
        self._closed = True
        for entry in self._drop_all():
            entry.result.callback("skipped")

    def mark_echoed(self, name: str) -> None:
        """Twilio echoed mark `name`: complete the utterance that sent it, if it is still current."""
        entry = self._active
        if entry is None or entry.mark is None or entry.mark != name:
            return
        self._finish(entry, "played")

    # -- internals ---------------------------------------------------------------------------

    def _pump(self) -> None:
        while self._active is None and self._queue and not self._closed:
            self._start(self._queue.popleft())

    def _start(self, entry: _Entry) -> None:
        self._active = entry
        self._seq += 1
        clock = self._scheduler.clock
        entry.deadline = clock.seconds() + self._synthesis_timeout
        self._scheduler.activate(self)
        synthesis = maybeDeferred(entry.synthesize, lambda chunk: self._on_chunk(entry, chunk))
        entry.synthesis = synthesis
        if entry is not self._active and not synthesis.called:
            # It failed while starting (an unusable first chunk): stop the synthesis too.
            synthesis.cancel()
        synthesis.addCallbacks(self._synthesized, self._synthesis_failed, callbackArgs=(entry,), errbackArgs=(entry,))

    def _on_chunk(self, entry: _Entry, chunk: AudioChunk) -> None:
        if entry is not self._active or entry.synthesized:
            return
        try:
            ulaw = self._convert(entry, chunk)
        except ValueError as e:
            self._fail(entry, PlaybackError(f"Telephony TTS produced unusable audio: {e}"))
            return
        self._add_frames(entry, entry.framer.feed(ulaw))

    def _convert(self, entry: _Entry, chunk: AudioChunk) -> bytes:
        fmt = (chunk.encoding, chunk.sample_rate)
        if entry.format is None:
            if chunk.encoding == "pcm16":
                entry.converter = PcmToUlaw(chunk.sample_rate)
            elif chunk.encoding != "ulaw" or chunk.sample_rate != SAMPLE_RATE:
                raise ValueError(f"unsupported format {chunk.encoding}/{chunk.sample_rate}")
            entry.format = fmt
        elif fmt != entry.format:
            raise ValueError(f"format changed from {entry.format[0]}/{entry.format[1]} to {fmt[0]}/{fmt[1]}")
        if entry.converter is not None:
            return entry.converter.feed(chunk.data)
        return chunk.data

    def _add_frames(self, entry: _Entry, frames: list[bytes]) -> None:
        if not frames:
            return
        entry.frames.extend(frames)
        entry.produced += len(frames)
        if len(entry.frames) > MAX_BUFFERED_FRAMES:
            self._fail(entry, PlaybackError(TOO_MUCH_AUDIO))

    def _synthesized(self, _result: object, entry: _Entry) -> None:
        if entry is not self._active or entry.synthesized:
            return
        rest = entry.converter.flush() if entry.converter is not None else b""
        frames = entry.framer.feed(rest) + entry.framer.flush(pad=True)
        self._add_frames(entry, frames)
        if entry is not self._active:
            return
        entry.synthesized = True
        if entry.produced == 0:
            self._fail(entry, PlaybackError(NO_AUDIO))
        elif not entry.frames:
            # Every frame went out while synthesis was still running.
            self._send_mark(entry)

    def _synthesis_failed(self, failure: Failure, entry: _Entry) -> None:
        if entry is not self._active or entry.synthesized:
            # Aborted (cleared, timed out, failed elsewhere): its errors no longer matter.
            return None
        self._fail(entry, failure)
        return None

    def _on_tick(self, now: float) -> bool:
        """Send this tick's frame; return whether the playback wants the next tick too."""
        entry = self._active
        if entry is None or entry.mark is not None:
            return False
        if not entry.synthesized and now >= entry.deadline:
            self._fail(entry, PlaybackError(TIMED_OUT.format(round(self._synthesis_timeout * 1000))))
            return self._active is not None
        frames = entry.frames
        if frames:
            entry.sent += 1
            if entry.first_sent_at is None:
                entry.first_sent_at = now
            if not self._sink.send_media(frames.popleft()):
                self._fail(entry, PlaybackError(NOT_DELIVERED.format(entry.sent)), clear=True)
                return self._active is not None
            if not frames and entry.synthesized:
                self._send_mark(entry)
                return False
            return True
        if not entry.synthesized:
            # Keep the stream warm until audio is buffered. A failed keep-alive changes nothing.
            self._sink.send_media(SILENCE_FRAME)
            return True
        return False

    def _send_mark(self, entry: _Entry) -> None:
        clock = self._scheduler.clock
        now = clock.seconds()
        name = f"tts-{int(now * 1000)}-{self._seq}"
        entry.mark = name
        self._scheduler.deactivate(self)
        if not self._sink.send_mark(name):
            self._fail(entry, PlaybackError(MARK_NOT_DELIVERED))
            return
        started = entry.first_sent_at if entry.first_sent_at is not None else now
        due = started + entry.sent * FRAME_SECONDS + MARK_MARGIN
        entry.mark_timer = clock.callLater(max(MARK_MARGIN, due - now), self._mark_timed_out, entry)

    def _mark_timed_out(self, entry: _Entry) -> None:
        entry.mark_timer = None
        if entry is not self._active:
            return
        self._log.warn(
            "no echo of mark {mark} after {frames} frames; completing the utterance",
            mark=entry.mark,
            frames=entry.sent,
        )
        self._finish(entry, "played")

    def _detach(self, entry: _Entry) -> None:
        """Make `entry` no longer current: stop its timers and its synthesis."""
        if self._active is entry:
            self._active = None
            self._scheduler.deactivate(self)
        if entry.mark_timer is not None:
            if entry.mark_timer.active():
                entry.mark_timer.cancel()
            entry.mark_timer = None
        entry.frames.clear()
        synthesis = entry.synthesis
        if synthesis is not None and not synthesis.called:
            # Its outcome, CancelledError included, is ignored by _synthesis_failed.
            synthesis.cancel()

    def _finish(self, entry: _Entry, outcome: str) -> None:
        self._detach(entry)
        entry.result.callback(outcome)
        self._pump()

    def _fail(self, entry: _Entry, error: Exception | Failure, clear: bool = False) -> None:
        self._detach(entry)
        if clear or entry.sent:
            self._sink.send_clear()
        entry.result.errback(error)
        self._pump()

    def _drop_all(self) -> list[_Entry]:
        dropped = []
        if self._active is not None:
            dropped.append(self._active)
            self._detach(self._active)
        dropped.extend(self._queue)
        self._queue.clear()
        return dropped

    def _cancelled(self, entry: _Entry) -> None:
        """The caller cancelled the utterance's Deferred (it then fails with CancelledError)."""
        if entry is self._active:
            self._detach(entry)
            if entry.sent:
                self._sink.send_clear()
            self._pump()
        else:
            try:
                self._queue.remove(entry)
            except ValueError:
                pass

