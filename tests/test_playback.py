"""
Tests for voicecall.media.playback: paced TTS playback on a media stream, driven by a Clock.
"""
from __future__ import annotations

import re

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from voicecall.infra.audio import FRAME_BYTES, SILENCE_FRAME, AudioChunk, resample_to_8k, ulaw_encode
from voicecall.media.playback import CATCHUP_PERIODS, Playback, PlaybackError, PlaybackScheduler

TICK = 0.02


class Sink:
    """Records what a playback sends, with the clock's time; can refuse chosen sends."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, str, object]] = []
        self.audio_sends = 0
        self.fail_audio_at: int | None = None
        self.fail_silence = False

    def send_media(self, frame: bytes) -> bool:
        if frame == SILENCE_FRAME and self.fail_silence:
            return False
        if frame != SILENCE_FRAME:
            self.audio_sends += 1
            if self.audio_sends == self.fail_audio_at:
                return False
        self.sent.append((self.clock.seconds(), "media", frame))
        return True

    def send_mark(self, name: str) -> bool:
        self.sent.append((self.clock.seconds(), "mark", name))
        return True

    def send_clear(self) -> bool:
        self.sent.append((self.clock.seconds(), "clear", None))
        return True

    def kinds(self) -> list[str]:
        return [kind for _, kind, _ in self.sent]

    def frames(self) -> list[bytes]:
        return [data for _, kind, data in self.sent if kind == "media"]

    def audio(self) -> list[bytes]:
        return [f for f in self.frames() if f != SILENCE_FRAME]

    def marks(self) -> list[str]:
        return [data for _, kind, data in self.sent if kind == "mark"]


class Synthesis:
    """A controllable TTS synthesis: the test pushes chunks and ends it."""

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = 0
        self.on_chunk = None
        self.deferred: Deferred | None = None

    def __call__(self, on_chunk) -> Deferred:
        self.calls += 1
        self.on_chunk = on_chunk

        def cancel(d: Deferred) -> None:
            self.cancelled += 1

        self.deferred = Deferred(cancel)
        return self.deferred

    def ulaw(self, data: bytes) -> None:
        self.on_chunk(AudioChunk(data, "ulaw", 8000))

    def finish(self) -> None:
        self.deferred.callback(None)


def instant(audio: bytes, encoding: str = "ulaw", rate: int = 8000):
    """A synthesis that delivers all of `audio` at once and completes."""

    def synthesize(on_chunk) -> Deferred:
        on_chunk(AudioChunk(audio, encoding, rate))
        d = Deferred()
        d.callback(None)
        return d

    return synthesize


def tone(frames: int) -> bytes:
    """`frames` distinguishable frames of mu-law (never the silence byte)."""
    return b"".join(bytes([i % 200 + 1]) * FRAME_BYTES for i in range(frames))


class PlaybackTestBase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.scheduler = PlaybackScheduler(self.clock, phases=4)  # the tests below assume a 5 ms grid
        self.sink = Sink(self.clock)
        self.playback = Playback(self.scheduler, self.sink, synthesis_timeout=1.0)

    def ticks(self, n: int) -> None:
        self.clock.advance(0)
        for _ in range(n):
            self.clock.advance(TICK)

    def play_and_finish_audio(self, frames: int = 3) -> tuple[Deferred, str]:
        """Play `frames` frames of audio until the mark is sent; returns the result and mark."""
        d = self.playback.play(instant(tone(frames)))
        self.ticks(frames - 1)
        return d, self.sink.marks()[-1]


class PlaybackTests(PlaybackTestBase):
    def test_keepalive_silence_during_synthesis(self):
        """While synthesis runs without audio, one 160-byte 0xFF frame goes out every 20 ms."""
        synthesis = Synthesis()
        d = self.playback.play(synthesis)
        self.ticks(4)
        self.assertEqual(self.sink.frames(), [b"\xff" * 160] * 5)
        self.assertEqual([t for t, _, _ in self.sent_media()], [0.0, 0.02, 0.04, 0.06, 0.08])
        self.assertEqual(self.sink.marks(), [])
        self.assertNoResult(d)

    def sent_media(self):
        return [entry for entry in self.sink.sent if entry[1] == "media"]

    def test_frames_paced_on_the_grid(self):
        """Audio goes out as 160-byte frames, one per 20 ms tick, in order."""
        audio = tone(5)
        self.playback.play(instant(audio))
        self.ticks(10)
        media = self.sent_media()
        self.assertEqual([round(t, 6) for t, _, _ in media], [0.0, 0.02, 0.04, 0.06, 0.08])
        self.assertEqual(b"".join(f for _, _, f in media), audio)
        self.assertTrue(all(len(f) == FRAME_BYTES for _, _, f in media))

    def test_pcm_is_converted_and_the_last_frame_padded(self):
        """pcm16 at its rate becomes 8 kHz mu-law frames; a partial last frame is padded with 0xFF."""
        pcm = bytes(range(256)) * 30  # 3,840 samples at 24 kHz -> 1,280 mu-law bytes
        self.playback.play(instant(pcm, "pcm16", 24000))
        self.ticks(12)
        expected = ulaw_encode(resample_to_8k(pcm, 24000))
        expected += b"\xff" * (-len(expected) % FRAME_BYTES)
        self.assertEqual(b"".join(self.sink.audio()), expected)

    def test_streamed_audio_follows_keepalives(self):
        """Audio arriving mid-synthesis goes out on the next tick, after the keep-alives."""
        synthesis = Synthesis()
        self.playback.play(synthesis)
        self.ticks(2)
        synthesis.ulaw(tone(2))
        self.clock.advance(TICK)
        frames = self.sink.frames()
        self.assertEqual(frames[:3], [SILENCE_FRAME] * 3)
        self.assertEqual(frames[3], tone(2)[:FRAME_BYTES])

    def test_mark_after_audio_completion_on_echo(self):
        """A mark tts-<ms>-<seq> follows the last frame; the utterance completes only on its echo."""
        d = self.playback.play(instant(tone(3)))
        self.ticks(1)
        self.assertEqual(self.sink.marks(), [])
        self.clock.advance(TICK)
        self.assertEqual(self.sink.kinds(), ["media"] * 3 + ["mark"])
        name = self.sink.marks()[0]
        self.assertRegex(name, r"^tts-40-1$")
        self.clock.advance(1)
        self.assertNoResult(d)
        self.playback.mark_echoed("tts-0-9")
        self.assertNoResult(d)
        self.assertTrue(self.playback.is_playing)
        self.playback.mark_echoed(name)
        self.assertEqual(self.successResultOf(d), "played")
        self.assertFalse(self.playback.is_playing)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_mark_timeout_completes(self):
        """Without an echo the utterance completes after its audio's duration plus a margin."""
        d, _ = self.play_and_finish_audio(3)
        self.clock.advance(5.0)
        self.assertNoResult(d)
        self.clock.advance(0.03)
        self.assertEqual(self.successResultOf(d), "played")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_queue_plays_sequentially_in_order(self):
        """Queued utterances synthesise one at a time and resolve in order."""
        first, second = Synthesis(), Synthesis()
        d1 = self.playback.play(first)
        d2 = self.playback.play(second)
        self.clock.advance(0)
        self.assertEqual((first.calls, second.calls), (1, 0))
        first.ulaw(tone(1))
        first.finish()
        self.clock.advance(TICK)
        self.playback.mark_echoed(self.sink.marks()[0])
        self.assertEqual(self.successResultOf(d1), "played")
        self.assertEqual(second.calls, 1)
        second.ulaw(tone(1))
        second.finish()
        self.ticks(1)
        self.assertEqual(len(self.sink.marks()), 2)
        self.assertTrue(self.sink.marks()[1].endswith("-2"))
        self.playback.mark_echoed(self.sink.marks()[1])
        self.assertEqual(self.successResultOf(d2), "played")

    def test_queue_holds_eight(self):
        """Eight utterances fit; the ninth fails with the SPEC text and changes nothing."""
        results = [self.playback.play(Synthesis()) for _ in range(8)]
        failure = self.failureResultOf(self.playback.play(Synthesis()), PlaybackError)
        self.assertEqual(str(failure.value), "Telephony TTS queue is full for stream; maxPending=8")
        for d in results:
            self.assertNoResult(d)
        self.assertEqual(self.playback.pending, 8)

    def test_clear_skips_queued_and_aborts_active(self):
        """clear() resolves queued entries "skipped", cancels the active synthesis, sends clear, leaves no timers."""
        active, queued = Synthesis(), Synthesis()
        d1 = self.playback.play(active)
        d2 = self.playback.play(queued)
        self.clock.advance(0)
        active.ulaw(tone(10))
        self.ticks(2)
        self.playback.clear()
        self.assertEqual(self.successResultOf(d1), "skipped")
        self.assertEqual(self.successResultOf(d2), "skipped")
        self.assertEqual(active.cancelled, 1)
        self.assertEqual(queued.calls, 0)
        self.assertEqual(self.sink.kinds()[-1], "clear")
        self.assertEqual(self.sink.marks(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.scheduler.running)

    def test_queue_recovers_after_clear(self):
        """After a clear the next utterance plays and completes normally."""
        self.playback.play(Synthesis())
        self.clock.advance(0)
        self.playback.clear()
        d, name = self.play_and_finish_audio(2)
        self.playback.mark_echoed(name)
        self.assertEqual(self.successResultOf(d), "played")

    def test_mark_echoed_after_clear_is_ignored(self):
        """An echo of a mark sent before a clear does not complete the next utterance."""
        d1, old = self.play_and_finish_audio(1)
        self.playback.clear()
        self.assertEqual(self.successResultOf(d1), "skipped")
        d2, new = self.play_and_finish_audio(1)
        self.assertNotEqual(old, new)
        self.playback.mark_echoed(old)
        self.assertNoResult(d2)
        self.playback.mark_echoed(new)
        self.assertEqual(self.successResultOf(d2), "played")

    def test_synthesis_timeout(self):
        """A synthesis still running at the timeout fails with the SPEC text, is cancelled, and sends no mark."""
        synthesis = Synthesis()
        d = self.playback.play(synthesis)
        self.ticks(49)
        self.assertNoResult(d)
        self.clock.advance(TICK)
        failure = self.failureResultOf(d, PlaybackError)
        self.assertEqual(str(failure.value), "Telephony TTS synthesis timed out after 1000ms")
        self.assertEqual(synthesis.cancelled, 1)
        self.assertEqual(self.sink.marks(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_audio(self):
        """A synthesis that completes without audio fails with "Telephony TTS produced no audio" and no mark."""
        synthesis = Synthesis()
        d = self.playback.play(synthesis)
        self.ticks(1)
        synthesis.finish()
        failure = self.failureResultOf(d, PlaybackError)
        self.assertEqual(str(failure.value), "Telephony TTS produced no audio")
        self.assertEqual(self.sink.marks(), [])
        self.assertNotIn("clear", self.sink.kinds())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_undelivered_frame_sends_clear_and_fails(self):
        """The first audio frame that cannot be sent stops playback: clear, then the SPEC error, no mark."""
        self.sink.fail_audio_at = 2
        d = self.playback.play(instant(tone(4)))
        self.ticks(4)
        failure = self.failureResultOf(d, PlaybackError)
        self.assertEqual(str(failure.value), "Telephony stream playback failed: audio chunk 2 not delivered")
        self.assertEqual(self.sink.kinds(), ["media", "clear"])
        self.assertEqual(self.sink.marks(), [])

    def test_failed_keepalive_changes_nothing(self):
        """Keep-alives that cannot be sent do not change the synthesis outcome."""
        self.sink.fail_silence = True
        synthesis = Synthesis()
        d = self.playback.play(synthesis)
        self.ticks(3)
        synthesis.ulaw(tone(1))
        synthesis.finish()
        self.clock.advance(TICK)
        self.playback.mark_echoed(self.sink.marks()[0])
        self.assertEqual(self.successResultOf(d), "played")

    def test_synthesis_error_rejects_the_entry(self):
        """A synthesis error fails that utterance with the error; the next one still plays."""
        synthesis = Synthesis()
        d1 = self.playback.play(synthesis)
        d2 = self.playback.play(instant(tone(1)))
        self.clock.advance(0)
        synthesis.deferred.errback(RuntimeError("TTS conversion failed: openai: 500"))
        self.assertEqual(str(self.failureResultOf(d1, RuntimeError).value), "TTS conversion failed: openai: 500")
        self.ticks(1)
        self.playback.mark_echoed(self.sink.marks()[-1])
        self.assertEqual(self.successResultOf(d2), "played")

    def test_cancelling_the_active_utterance(self):
        """Cancelling play()'s Deferred aborts that utterance (clear if audio went out) and starts the next."""
        synthesis = Synthesis()
        d1 = self.playback.play(synthesis)
        d2 = self.playback.play(Synthesis())
        self.clock.advance(0)
        synthesis.ulaw(tone(5))
        self.clock.advance(TICK)
        d1.cancel()
        self.failureResultOf(d1, CancelledError)
        self.assertEqual(synthesis.cancelled, 1)
        self.assertEqual(self.sink.kinds()[-1], "clear")
        self.assertTrue(self.playback.is_playing)
        self.assertNoResult(d2)

    def test_close_skips_everything_and_refuses_more(self):
        """When the stream ends, pending utterances resolve "skipped" and new ones fail."""
        d1 = self.playback.play(Synthesis())
        d2 = self.playback.play(Synthesis())
        self.clock.advance(0)
        before = list(self.sink.sent)
        self.playback.close()
        self.assertEqual(self.successResultOf(d1), "skipped")
        self.assertEqual(self.successResultOf(d2), "skipped")
        self.assertEqual(self.sink.sent, before)
        failure = self.failureResultOf(self.playback.play(Synthesis()), PlaybackError)
        self.assertEqual(str(failure.value), "Telephony stream playback failed: stream closed")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unusable_audio_fails(self):
        """Audio in a format playback cannot convert fails the utterance."""
        d = self.playback.play(instant(b"\x00" * 320, "ulaw", 16000))
        failure = self.failureResultOf(d, PlaybackError)
        self.assertIn("unsupported format ulaw/16000", str(failure.value))


class SchedulerTests(PlaybackTestBase):
    def streams(self, n: int, frames: int = 10) -> list[tuple[Playback, Sink]]:
        """`n` playbacks on the shared scheduler, each playing `frames` frames of audio."""
        made = []
        for _ in range(n):
            sink = Sink(self.clock)
            playback = Playback(self.scheduler, sink)
            playback.play(instant(tone(frames)))
            made.append((playback, sink))
        return made

    def advance_to(self, t: float) -> None:
        """Run the clock to `t`, stopping at every timer on the way (each fires on time)."""
        while True:
            calls = sorted(c.getTime() for c in self.clock.getDelayedCalls())
            if not calls or calls[0] > t + 1e-12:
                break
            self.clock.advance(max(0.0, calls[0] - self.clock.seconds()))
        self.clock.advance(max(0.0, t - self.clock.seconds()))

    def test_one_tick_drives_many_streams(self):
        """One timer serves every playing stream, each getting exactly one frame every 20 ms."""
        streams = self.streams(50)
        for n in range(1, 6):
            self.advance_to(0.015 + (n - 1) * TICK)  # every phase's point of period n has passed
            self.assertEqual({len(sink.frames()) for _, sink in streams}, {n})
            self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(self.scheduler.active_count, 50)

    def test_streams_spread_over_four_phases(self):
        """Streams started together are spread over the 4 phases: each tick sends one phase's frames."""
        streams = self.streams(8)
        self.assertEqual([self.scheduler.phase_of(p) for p, _ in streams], [0, 1, 2, 3, 0, 1, 2, 3])
        self.advance_to(0.04)
        by_time: dict[float, int] = {}
        for _, sink in streams:
            for t, _, _ in sink.sent:
                by_time[round(t, 6)] = by_time.get(round(t, 6), 0) + 1
        self.assertEqual(sorted(by_time), [0.0, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04])
        self.assertEqual(set(by_time.values()), {2})

    def test_each_stream_exactly_every_20ms_on_its_phase(self):
        """Whatever its phase, a stream's frames are 20 ms apart, on the grid from its phase point."""
        streams = self.streams(6, frames=20)
        self.advance_to(0.5)
        for _, sink in streams:
            times = [t for t, kind, _ in sink.sent if kind == "media"]
            self.assertEqual(len(times), 20)
            start = times[0]
            for k, t in enumerate(times):
                self.assertAlmostEqual(t, start + k * TICK, places=9)
        self.assertEqual(sorted({round(s.sent[0][0], 6) for _, s in streams}), [0.0, 0.005, 0.01, 0.015])

    def test_new_stream_joins_the_least_busy_phase(self):
        """A stream starting while others play joins the phase with the fewest streams."""
        streams = self.streams(5, frames=100)  # phases 0, 1, 2, 3, 0
        self.clock.advance(0.001)
        [(late, _)] = self.streams(1, frames=100)
        self.assertEqual(self.scheduler.phase_of(late), 1)  # 1, 2, 3 hold one each; 1 comes first
        streams[2][0].clear()  # phase 2 now holds none
        [(later, _)] = self.streams(1, frames=100)
        self.assertEqual(self.scheduler.phase_of(later), 2)

    def test_only_busy_phases_wake_the_timer(self):
        """With one stream, the timer fires every 20 ms, not every 5 ms."""
        self.streams(1, frames=20)
        self.advance_to(0.2)
        self.assertEqual(self.scheduler.ticks, 11)
        [call] = self.clock.getDelayedCalls()
        self.assertAlmostEqual(call.getTime(), 0.22)

    def test_joining_an_earlier_phase_moves_the_timer_forward(self):
        """A stream joining a phase due before the timer's next point is served on time."""
        self.streams(1, frames=20)
        self.clock.advance(0.001)
        [(second, sink)] = self.streams(1, frames=20)
        self.assertEqual(self.scheduler.phase_of(second), 1)
        [call] = self.clock.getDelayedCalls()
        self.assertAlmostEqual(call.getTime(), 0.005)
        self.advance_to(0.005)
        self.assertEqual([round(t, 6) for t, _, _ in sink.sent], [0.005])

    def test_streams_awaiting_marks_are_not_visited(self):
        """Playbacks waiting for a mark echo leave the tick; only streams with frames are visited."""
        waiting = [Playback(self.scheduler, Sink(self.clock)) for _ in range(9)]
        for playback in waiting:
            playback.play(instant(tone(1)))
        self.advance_to(0.02)
        self.assertEqual(self.scheduler.active_count, 0)
        self.assertFalse(self.scheduler.running)
        self.assertTrue(all(p.is_playing for p in waiting))
        self.playback.play(instant(tone(3)))
        self.clock.advance(0)
        self.assertEqual(self.scheduler.active_count, 1)

    def test_idle_without_playback(self):
        """With nothing to send the scheduler holds no timer."""
        d, name = self.play_and_finish_audio(2)
        self.assertFalse(self.scheduler.running)
        self.playback.mark_echoed(name)
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_late_tick_does_not_shift_the_grid(self):
        """A late tick schedules the next one at the next grid point, not an interval after itself."""
        self.playback.play(Synthesis())
        self.clock.advance(0)
        self.clock.advance(0.027)
        [call] = self.clock.getDelayedCalls()
        self.assertAlmostEqual(call.getTime(), 0.04)
        self.assertAlmostEqual(self.scheduler.max_lateness, 0.007)

    def test_stall_is_caught_up(self):
        """A tick three periods late sends the frames owed at once; the stream is back on its grid."""
        synthesis = Synthesis()
        self.playback.play(synthesis)
        self.clock.advance(0)  # t=0: a keep-alive
        synthesis.ulaw(tone(10))
        self.clock.advance(0.075)  # the 20, 40 and 60 ms frames are due
        self.assertEqual(len(self.sink.frames()), 4)
        [call] = self.clock.getDelayedCalls()
        self.assertAlmostEqual(call.getTime(), 0.08)
        self.advance_to(0.2)
        times = [round(t, 6) for t, kind, _ in self.sink.sent if kind == "media"][4:]
        self.assertEqual(times, [round(0.08 + k * TICK, 6) for k in range(len(times))])
        self.assertEqual(self.scheduler.missed_ticks, 0)

    def test_long_stall_is_caught_up_only_so_far(self):
        """After a stall of more than CATCHUP_PERIODS periods, older points are skipped, not burst."""
        synthesis = Synthesis()
        self.playback.play(synthesis)
        self.clock.advance(0)
        synthesis.ulaw(tone(10))
        self.clock.advance(0.205)  # ten periods owed
        self.assertEqual(len(self.sink.frames()), 1 + CATCHUP_PERIODS)
        self.assertEqual(self.scheduler.missed_ticks, 10 - CATCHUP_PERIODS)
        [call] = self.clock.getDelayedCalls()
        self.assertAlmostEqual(call.getTime(), 0.22)

    def test_late_tick_serves_every_due_phase_once(self):
        """A tick late past the next phase's point serves both phases, each stream once, and keeps the grid."""
        streams = self.streams(4, frames=20)
        self.clock.advance(0)
        self.clock.advance(0.012)  # the 5 ms point fires at 12 ms: the 10 ms point is due too
        self.assertEqual([len(s.frames()) for _, s in streams], [1, 1, 1, 0])
        self.assertEqual([round(s.sent[0][0], 6) for _, s in streams[1:3]], [0.012, 0.012])
        self.assertAlmostEqual(self.scheduler.max_lateness, 0.007)
        [call] = self.clock.getDelayedCalls()
        self.assertAlmostEqual(call.getTime(), 0.015)
        self.advance_to(0.1)
        for _, sink in streams:
            times = [round(t, 6) for t, _, _ in sink.sent]
            self.assertEqual(times[1:], [round(times[1] + k * TICK, 6) for k in range(len(times) - 1)])
        self.assertEqual(self.scheduler.missed_ticks, 0)

    def test_drift_correction_on_the_absolute_clock(self):
        """Ticks that each run a little late do not accumulate lateness: frames stay on the grid."""
        streams = self.streams(4, frames=200)
        self.clock.advance(0)
        while self.clock.seconds() < 3.0:
            [call] = self.clock.getDelayedCalls()
            self.clock.advance(call.getTime() - self.clock.seconds() + 0.0015)  # every tick 1.5 ms late
        for n, (_, sink) in enumerate(streams):
            times = [t for t, kind, _ in sink.sent if kind == "media"][1:]
            self.assertGreater(len(times), 140)
            for k, t in enumerate(times, start=1):
                self.assertAlmostEqual(t, n * 0.005 + k * TICK + 0.0015, places=9)
        self.assertEqual(self.scheduler.missed_ticks, 0)

    def test_one_phase_is_the_single_shared_tick(self):
        """phases=1 gives the plain 20 ms tick: every stream on every tick."""
        scheduler = PlaybackScheduler(self.clock, phases=1)
        sinks = [Sink(self.clock) for _ in range(5)]
        for sink in sinks:
            Playback(scheduler, sink).play(instant(tone(3)))
        self.ticks(2)
        self.assertEqual({tuple(round(t, 6) for t, kind, _ in s.sent if kind == "media") for s in sinks}, {(0.0, 0.02, 0.04)})
        self.assertRaises(ValueError, PlaybackScheduler, self.clock, phases=0)

    def test_mark_names_are_unique_per_stream(self):
        """Mark names carry the time in ms and a per-stream sequence number."""
        names = []
        for _ in range(3):
            d, name = self.play_and_finish_audio(1)
            self.playback.mark_echoed(name)
            self.successResultOf(d)
            names.append(name)
        self.assertEqual(len(set(names)), 3)
        self.assertEqual([re.match(r"tts-\d+-(\d+)$", n).group(1) for n in names], ["1", "2", "3"])
