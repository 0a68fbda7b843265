"""
Tests for L{voicecall.infra.audio}: G.711 mu-law, resampling to 8 kHz, streaming conversion, framing.

Oracles: a literal, one-sample-at-a-time transcription of SPEC §12.3 (the encoder must match it
on all 65,536 inputs); the stdlib C{audioop} (decode identical; encode identical on positive
samples and mirrored on negative ones, see L{UlawAudioopOracleTests}); and C{soxr} (an
independent band-limited resampler) for the resampled audio.
"""
from __future__ import annotations

import warnings

import numpy as np
import soxr
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from voicecall.infra.audio import (
    FRAME_BYTES,
    SAMPLE_RATE,
    SILENCE_FRAME,
    Framer,
    PcmToUlaw,
    resample_to_8k,
    ulaw_decode,
    ulaw_encode,
)

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
except ImportError:  # Python 3.13+ without the audioop-lts backport
    audioop = None

_NO_AUDIOOP = (
    "audioop is not importable: it was removed from the stdlib in Python 3.13 "
    "(install audioop-lts there to run these oracle tests)"
)

ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int32)
RATES = [6000, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000]


def pcm(samples) -> bytes:
    """16-bit little-endian bytes of C{samples}."""
    return np.asarray(samples).astype("<i2").tobytes()


def samples_of(data: bytes) -> np.ndarray:
    """The samples of 16-bit little-endian PCM, as floats."""
    return np.frombuffer(data, dtype="<i2").astype(np.float64)


def tone(freq: float, rate: int, seconds: float, amplitude: float = 12000.0) -> np.ndarray:
    """A sine tone starting at phase 0, rounded to 16-bit samples."""
    t = np.arange(int(round(rate * seconds))) / rate
    return np.round(amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def rms(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.sqrt(np.mean(x * x)))


def amplitude(x: np.ndarray, freq: float, rate: int = 8000) -> float:
    """The amplitude of the C{freq} sinusoid in C{x}, by a least-squares fit."""
    t = np.arange(len(x)) / rate
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)], axis=1)
    (a, b), *_ = np.linalg.lstsq(basis, x, rcond=None)
    return float(np.hypot(a, b))


def noise(rate: int, seconds: float, seed: int) -> np.ndarray:
    """Loud white noise (every frequency, clipping included) as 16-bit samples."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 9000.0, int(rate * seconds))
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def spec_ulaw(sample: int) -> int:
    """
    SPEC §12.3's mu-law encoder transcribed literally: bias 132, clip 32635, sign bit 0x80,
    exponent searched from mask 0x4000, mantissa C{(s >> (exp + 3)) & 0x0F}, byte inverted.
    """
    sign = 0x80 if sample < 0 else 0x00
    s = min(-sample if sample < 0 else sample, 32635) + 132
    exponent, mask = 7, 0x4000
    while exponent > 0 and not s & mask:
        exponent -= 1
        mask >>= 1
    mantissa = (s >> (exponent + 3)) & 0x0F
    return ~(sign | exponent << 4 | mantissa) & 0xFF


def spec_ulaw_decode(byte: int) -> int:
    """PROVIDERS §6.1's decoder transcribed literally."""
    u = ~byte & 0xFF
    exponent, mantissa = (u >> 4) & 0x07, u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return -magnitude if u & 0x80 else magnitude


class UlawCodecTests(SynchronousTestCase):
    """
    Mu-law encoding and decoding as SPEC §12.3 and PROVIDERS §6.1 describe them.
    """

    def test_encode_matches_spec_on_every_sample(self):
        """Every one of the 65,536 16-bit samples encodes exactly as SPEC §12.3's algorithm."""
        expected = bytes(spec_ulaw(int(x)) for x in ALL_SAMPLES)
        self.assertEqual(ulaw_encode(pcm(ALL_SAMPLES)), expected)

    def test_encode_worked_values(self):
        """Hand-computed codes: zero, +-1000, the clip level and both extremes."""
        self.assertEqual(
            ulaw_encode(pcm([0, 1000, -1000, 32635, 32767, -32768, -1])),
            bytes([0xFF, 0xCE, 0x4E, 0x80, 0x80, 0x00, 0x7F]),
        )

    def test_encode_is_sign_symmetric(self):
        """Negating a sample only flips the sign bit of its code (sign-magnitude G.711)."""
        positive = np.arange(1, 32768)
        pos = np.frombuffer(ulaw_encode(pcm(positive)), dtype=np.uint8)
        neg = np.frombuffer(ulaw_encode(pcm(-positive)), dtype=np.uint8)
        np.testing.assert_array_equal(neg, pos ^ 0x80)

    def test_decode_matches_formula(self):
        """All 256 codes decode as PROVIDERS §6.1's formula, little-endian, two bytes each."""
        expected = pcm([spec_ulaw_decode(b) for b in range(256)])
        self.assertEqual(ulaw_decode(bytes(range(256))), expected)

    def test_decode_known_values(self):
        """0xFF and 0x7F are zero and the range is +-32,124."""
        self.assertEqual(
            samples_of(ulaw_decode(b"\xff\x7f\x80\x00")).tolist(), [0, 0, 32124, -32124]
        )

    def test_silence_frame(self):
        """The silence frame is 160 bytes of 0xFF, 20 ms of zero samples at 8 kHz."""
        self.assertEqual((FRAME_BYTES, SAMPLE_RATE), (160, 8000))
        self.assertEqual(SILENCE_FRAME, b"\xff" * 160)
        self.assertEqual(ulaw_decode(SILENCE_FRAME), b"\x00" * 320)

    def test_round_trip_is_fixed_after_one_pass(self):
        """Decoding then re-encoding any code gives the same code back, except 0x7F (-0 -> +0)."""
        codes = bytes(range(256))
        again = ulaw_encode(ulaw_decode(codes))
        self.assertEqual(
            [c for c, a in zip(codes, again, strict=True) if c != a], [0x7F]
        )
        self.assertEqual(again[0x7F], 0xFF)

    def test_encode_rejects_odd_length(self):
        """Half a sample is refused with a clear error rather than silently dropped."""
        exc = self.assertRaises(ValueError, ulaw_encode, b"\x00\x01\x02")
        self.assertIn("even number of bytes", str(exc))

    def test_empty(self):
        """Empty input gives empty output both ways."""
        self.assertEqual((ulaw_encode(b""), ulaw_decode(b"")), (b"", b""))

    def test_accepts_buffers(self):
        """bytearray and memoryview input convert like bytes."""
        data = pcm(tone(440, 8000, 0.05))
        self.assertEqual(ulaw_encode(bytearray(data)), ulaw_encode(data))
        self.assertEqual(ulaw_encode(memoryview(data)), ulaw_encode(data))


class UlawAudioopOracleTests(SynchronousTestCase):
    """
    The stdlib C{audioop} as an independent oracle.

    Where they differ: SPEC §12.3 (and so this module) quantises the magnitude of a 16-bit
    sample with bias 132 and keeps the sign apart. C{audioop.lin2ulaw} first shifts the
    two's-complement sample right by two bits (to G.711's 14-bit input), which floors, so a
    negative sample is rounded away from zero: on 381 negative inputs, those within three of a
    quantisation boundary (-1 included), audioop returns the code of the next larger magnitude,
    one code lower (-1 -> 0x7E, which decodes to -8; ours 0x7F, which decodes to 0). Both use
    the same clip (audioop's 14-bit 8159 is 32635 >> 2) and bias (33 is 132 >> 2), and decode
    identically. We follow the SPEC: it is what the plugin sends, it is the textbook 16-bit
    routine, and it is symmetric. Hence the exact relation checked here: positive samples
    encode as audioop does, and a negative sample encodes as audioop encodes its magnitude,
    with the sign bit cleared (C{0x80} flipped).
    """

    if audioop is None:
        skip = _NO_AUDIOOP

    def ours(self, samples) -> np.ndarray:
        return np.frombuffer(ulaw_encode(pcm(samples)), dtype=np.uint8)

    def theirs(self, samples) -> np.ndarray:
        return np.frombuffer(audioop.lin2ulaw(pcm(samples), 2), dtype=np.uint8)

    def test_decode_identical(self):
        """All 256 codes decode exactly as audioop.ulaw2lin does."""
        self.assertEqual(ulaw_decode(bytes(range(256))), audioop.ulaw2lin(bytes(range(256)), 2))

    def test_positive_samples_identical(self):
        """Every sample from 0 to 32,767 encodes exactly as audioop.lin2ulaw does."""
        positive = np.arange(0, 32768)
        np.testing.assert_array_equal(self.ours(positive), self.theirs(positive))

    def test_negative_samples_mirror_audioop(self):
        """Every negative sample encodes as audioop encodes its magnitude, sign bit cleared."""
        negative = np.arange(-32768, 0)
        magnitude = np.minimum(-negative, 32767)
        np.testing.assert_array_equal(self.ours(negative), self.theirs(magnitude) ^ 0x80)

    def test_documented_differences(self):
        """Direct comparison differs on exactly 381 negative samples, by exactly one code."""
        ours, theirs = self.ours(ALL_SAMPLES), self.theirs(ALL_SAMPLES)
        differ = ours != theirs
        self.assertEqual(int(differ.sum()), 381)
        self.assertTrue((ALL_SAMPLES[differ] < 0).all())
        self.assertEqual(set((ours[differ].astype(int) - theirs[differ]).tolist()), {1})
        self.assertEqual((int(ours[32767]), int(theirs[32767])), (0x7F, 0x7E))  # sample -1

    @settings(max_examples=50, deadline=None)
    @given(st.binary(max_size=4000))
    def test_random_buffers(self, raw):
        """Random byte buffers decode identically and encode by the relation above."""
        self.assertEqual(ulaw_decode(raw), audioop.ulaw2lin(raw, 2))
        x = np.frombuffer(raw[: len(raw) // 2 * 2], dtype="<i2").astype(np.int32)
        expected = np.where(
            x < 0, self.theirs(np.minimum(np.abs(x), 32767)) ^ 0x80, self.theirs(x)
        )
        np.testing.assert_array_equal(self.ours(x), expected)


class ResampleTests(SynchronousTestCase):
    """
    L{resample_to_8k}: SPEC §12.3 and the §19 telephony-audio checks, plus the filter's own
    claims (flat voice band, aliases suppressed) checked against soxr.
    """

    def test_8k_returned_unchanged(self):
        """8 kHz input is returned as it is, the very object."""
        data = pcm(noise(8000, 0.1, seed=1))
        self.assertIs(resample_to_8k(data, 8000), data)

    def test_1k_tone_at_48k_keeps_energy(self):
        """A 1 kHz tone at 48 kHz (amplitude 12,000, 0.6 s) gives 4,800 samples, RMS > 7,500."""
        out = resample_to_8k(pcm(tone(1000, 48000, 0.6)), 48000)
        # SPEC §19 says "9,600 samples for 0.6 s": that is the byte count (0.6 s x 8 kHz x 2).
        self.assertEqual(len(out), 4800 * 2)
        self.assertGreater(rms(samples_of(out)), 7500)

    def test_6k_tone_at_48k_attenuated(self):
        """A 6 kHz tone at 48 kHz comes out at under 0.1x the RMS of a 1 kHz tone."""
        low = rms(samples_of(resample_to_8k(pcm(tone(1000, 48000, 0.6)), 48000)))
        high = rms(samples_of(resample_to_8k(pcm(tone(6000, 48000, 0.6)), 48000)))
        self.assertLess(high, 0.1 * low)

    def test_half_second_of_24k(self):
        """0.5 s of 24 kHz PCM becomes 4,000 samples (8,000 bytes)."""
        self.assertEqual(len(resample_to_8k(pcm(noise(24000, 0.5, seed=2)), 24000)), 8000)

    @settings(max_examples=100, deadline=None)
    @given(st.sampled_from(RATES), st.integers(min_value=0, max_value=5000))
    def test_length_is_floor(self, rate, n):
        """n input samples give exactly floor(n * 8000 / rate) output samples."""
        out = resample_to_8k(b"\x01\x00" * n, rate)
        self.assertEqual(len(out), 2 * (n * 8000 // rate))

    def test_voice_band_flat(self):
        """Tones from 100 Hz to 3.4 kHz keep their RMS within 0.1 dB at 22.05, 24 and 48 kHz."""
        for rate in (22050, 24000, 48000):
            for freq in range(100, 3401, 150):
                out = samples_of(resample_to_8k(pcm(tone(freq, rate, 0.25)), rate))
                gain = amplitude(out[200:-200], freq) / 12000
                self.assertLess(abs(gain - 1.0), 0.012, (rate, freq))

    def test_aliases_suppressed(self):
        """Tones that would fold back below 3.4 kHz (4.6 kHz up to Nyquist) lose at least 60 dB."""
        for rate in (22050, 24000, 48000):
            for freq in np.arange(4600, rate / 2, 397.0):
                out = samples_of(resample_to_8k(pcm(tone(freq, rate, 0.25)), rate))
                self.assertLess(rms(out[200:-200]), 12000 / np.sqrt(2) / 1000, (rate, freq))

    def test_agrees_with_soxr(self):
        """Voice-band audio resampled matches soxr's high-quality resampler within 8 LSB."""
        for rate in (11025, 16000, 22050, 24000, 44100, 48000):
            x = (
                tone(300, rate, 0.5, 5000).astype(np.int32)
                + tone(1234, rate, 0.5, 5000)
                + tone(2900, rate, 0.5, 5000)
            )
            ours = samples_of(resample_to_8k(pcm(x), rate))
            theirs = soxr.resample(x.astype(np.int16), rate, 8000, quality="HQ").astype(float)
            # soxr rounds the output length, we floor it (SPEC §12.3): 11,025 Hz differs by one.
            n = min(len(ours), len(theirs))
            self.assertLessEqual(abs(len(ours) - len(theirs)), 1)
            difference = (ours[:n] - theirs[:n])[80:-80]
            self.assertLess(np.abs(difference).max(), 8, rate)
            self.assertLess(rms(difference), 2.5, rate)

    def test_clips_instead_of_wrapping(self):
        """A full-scale square wave overshoots in the filter and is clipped, not wrapped."""
        square = np.where(tone(500, 24000, 0.2) >= 0, 32767, -32768)
        out = samples_of(resample_to_8k(pcm(square), 24000))
        self.assertEqual((out.max(), out.min()), (32767, -32768))
        # Wrapping would put full-scale negative samples among the positive half-periods.
        self.assertTrue((out[20:][np.roll(out, 1)[20:] > 30000] > 0).all())

    def test_rejects_odd_length(self):
        """Half a sample is refused with a clear error, at 8 kHz too."""
        for rate in (8000, 24000):
            self.assertRaises(ValueError, resample_to_8k, b"\x00\x00\x00", rate)

    def test_rejects_unsupported_rates(self):
        """Zero, negative, huge, non-integer and odd rates are refused with a clear error."""
        for rate in (0, -8000, 999, 10**6, 24000.0, True, 44099, "24000"):
            exc = self.assertRaises(ValueError, resample_to_8k, b"", rate)
            self.assertIn("unsupported input sample rate", str(exc))


class PcmToUlawTests(SynchronousTestCase):
    """
    L{PcmToUlaw}, the incremental converter for one synthesis.
    """

    def convert(self, rate: int, data: bytes, sizes: list[int]) -> tuple[bytes, bytes]:
        """Feed C{data} in chunks of C{sizes} (cycled); return (output of feeds, of flush)."""
        converter = PcmToUlaw(rate)
        out, i, k = [], 0, 0
        while i < len(data):
            size = sizes[k % len(sizes)]
            out.append(converter.feed(data[i : i + size]))
            i, k = i + size, k + 1
        return b"".join(out), converter.flush()

    def test_half_second_of_24k(self):
        """0.5 s of 24 kHz PCM becomes exactly 4,000 mu-law bytes, whole or in 4 KiB chunks."""
        data = pcm(noise(24000, 0.5, seed=3))
        for sizes in ([len(data)], [4096]):
            fed, rest = self.convert(24000, data, sizes)
            self.assertEqual(len(fed + rest), 4000)

    @settings(max_examples=60, deadline=None)
    @given(
        rate=st.sampled_from(RATES),
        seconds=st.floats(min_value=0.0, max_value=0.4),
        sizes=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=20),
        seed=st.integers(min_value=0, max_value=2**16),
    )
    def test_chunking_changes_nothing(self, rate, seconds, sizes, seed):
        """Any chunking, odd sizes included, gives the bytes of the one-shot conversion."""
        data = pcm(noise(rate, seconds, seed))
        fed, rest = self.convert(rate, data, sizes)
        self.assertEqual(fed + rest, ulaw_encode(resample_to_8k(data, rate)))

    def test_single_bytes(self):
        """Feeding one byte at a time (every other feed ends mid-sample) loses nothing."""
        data = pcm(noise(22050, 0.05, seed=4))
        fed, rest = self.convert(22050, data, [1])
        self.assertEqual(fed + rest, ulaw_encode(resample_to_8k(data, 22050)))

    def test_8k_is_encoded_without_resampling(self):
        """At 8 kHz the output is the plain mu-law encoding, available as soon as fed."""
        data = pcm(noise(8000, 0.1, seed=5))
        fed, rest = self.convert(8000, data, [333])
        self.assertEqual((fed, rest), (ulaw_encode(data), b""))

    def test_first_frame_is_early(self):
        """30 ms of 24 or 22.05 kHz input already yields a full 20 ms frame (low look-ahead)."""
        for rate in (22050, 24000):
            converter = PcmToUlaw(rate)
            first = converter.feed(pcm(noise(rate, 0.030, seed=6)))
            self.assertGreaterEqual(len(first), FRAME_BYTES, rate)

    def test_output_is_steady(self):
        """Each 20 ms chunk of input releases close to 20 ms of output, not bursts."""
        rate = 24000
        converter = PcmToUlaw(rate)
        data = pcm(noise(rate, 1.0, seed=7))
        step = rate * 2 // 50
        sizes = [len(converter.feed(data[i : i + step])) for i in range(0, len(data), step)]
        self.assertTrue(all(159 <= n <= 161 for n in sizes[2:]), sizes)

    def test_trailing_odd_byte_dropped(self):
        """A dangling half sample at the very end is dropped, not encoded."""
        data = pcm(noise(24000, 0.1, seed=8))
        fed, rest = self.convert(24000, data + b"\x7f", [1001])
        self.assertEqual(fed + rest, ulaw_encode(resample_to_8k(data, 24000)))

    def test_empty_stream(self):
        """A synthesis that produced nothing converts to nothing."""
        converter = PcmToUlaw(24000)
        self.assertEqual((converter.feed(b""), converter.flush()), (b"", b""))

    def test_no_feed_after_flush(self):
        """The converter ends at flush: a later feed fails loudly, a second flush is empty."""
        converter = PcmToUlaw(24000)
        converter.feed(pcm(noise(24000, 0.1, seed=9)))
        self.assertNotEqual(converter.flush(), b"")
        self.assertEqual(converter.flush(), b"")
        self.assertRaises(RuntimeError, converter.feed, b"\x00\x00")

    def test_rejects_unsupported_rates(self):
        """An unusable input rate is refused when the converter is made."""
        for rate in (0, 44099, 10**6):
            self.assertRaises(ValueError, PcmToUlaw, rate)


class FramerTests(SynchronousTestCase):
    """
    L{Framer}, which cuts mu-law into 160-byte frames.
    """

    chunks = st.lists(st.binary(max_size=700), max_size=30)

    @settings(max_examples=100, deadline=None)
    @given(chunks)
    def test_frames_exact_and_lossless(self, chunks):
        """Every frame is 160 bytes; frames plus the unpadded rest are exactly the input."""
        framer = Framer()
        frames = [f for c in chunks for f in framer.feed(c)]
        self.assertTrue(all(len(f) == FRAME_BYTES for f in frames))
        rest = framer.flush(pad=False)
        self.assertEqual(b"".join(frames + rest), b"".join(chunks))
        self.assertLessEqual(sum(map(len, rest)), FRAME_BYTES - 1)

    @settings(max_examples=100, deadline=None)
    @given(chunks)
    def test_padded_flush(self, chunks):
        """With padding, the stream comes out whole in 160-byte frames ending in 0xFF fill."""
        framer = Framer()
        frames = [f for c in chunks for f in framer.feed(c)] + framer.flush()
        data = b"".join(chunks)
        self.assertTrue(all(len(f) == FRAME_BYTES for f in frames))
        self.assertEqual(len(frames), -(-len(data) // FRAME_BYTES))
        joined = b"".join(frames)
        self.assertEqual(joined[: len(data)], data)
        self.assertEqual(joined[len(data) :], b"\xff" * (len(joined) - len(data)))

    def test_frame_released_when_complete(self):
        """A frame is returned by the feed that completes it, and not before."""
        framer = Framer()
        self.assertEqual(framer.feed(b"\x01" * 159), [])
        self.assertEqual(framer.feed(b"\x02" * 2), [b"\x01" * 159 + b"\x02"])
        self.assertEqual(framer.feed(b"\x03" * 320), [b"\x02" + b"\x03" * 159, b"\x03" * 160])
        self.assertEqual(framer.flush(), [b"\x03" + b"\xff" * 159])

    def test_flush_when_empty(self):
        """Flushing with nothing held yields no frame, padded or not, and the framer is reusable."""
        framer = Framer()
        self.assertEqual(framer.flush(), [])
        framer.feed(b"\x00" * 10)
        framer.flush()
        self.assertEqual((framer.flush(), framer.flush(pad=False)), ([], []))
        self.assertEqual(framer.feed(b"\x05" * 160), [b"\x05" * 160])
