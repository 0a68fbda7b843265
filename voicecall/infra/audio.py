# -*- test-case-name: tests.test_audio -*-
"""
Telephony audio: G.711 mu-law and resampling of 16-bit PCM to 8 kHz (SPEC §12.3).

Text-to-speech providers deliver raw 16-bit little-endian mono PCM (OpenAI 24 kHz, ElevenLabs
22.05 kHz) in chunks of arbitrary size, an odd number of bytes included. Twilio media streams
carry 8 kHz mu-law in 20 ms frames of 160 bytes. L{PcmToUlaw} turns one synthesis into mu-law
incrementally and L{Framer} cuts the result into frames; L{ulaw_encode}, L{ulaw_decode} and
L{resample_to_8k} are the one-shot forms.

Mu-law follows SPEC §12.3 to the bit (the classic sign-magnitude routine: bias 132, clip 32635),
through a 65,536-entry encode table and a 256-entry decode table. It differs from the stdlib
C{audioop.lin2ulaw} on 381 negative inputs (see L{ulaw_encode}).

Resampling is a band-limited polyphase filter: a Kaiser-windowed sinc (beta 6) spanning 4.5 ms
of input, -6 dB at 3.8 kHz, flat to within 0.1 dB up to 3.4 kHz (the telephone band) and
attenuating by at least 60 dB everything that would fold back below 3.4 kHz. It replaces the
SPEC's [H] 31-tap Hann filter, whose transition band widens with the input rate (at 48 kHz its
31 taps span 0.65 ms: -4 dB at 3.4 kHz, and a 4.6 kHz tone, which folds to 3.4 kHz, loses only
12 dB), and meets the SPEC's tone tests with a wide margin. The output length is exactly C{floor(n * 8000 / rate)} samples, and the output does
not depend on how the input was chunked: feeding a stream piecemeal gives the same bytes as
converting it at once. It needs only 2.25 ms of input look-ahead, so the first 20 ms frame is
ready after about 23 ms of input audio; block resamplers such as soxr (HQ) hold back 75-90 ms of
input before their first output, which would break the 30 ms first-frame target of DESIGN.md.

This module is a leaf: it imports nothing of ours.
"""
from __future__ import annotations

import functools
from math import gcd

import numpy as np
from attrs import define, field, frozen
from numpy.lib.stride_tricks import sliding_window_view

__all__ = [
    "FRAME_BYTES",
    "SAMPLE_RATE",
    "SILENCE_FRAME",
    "Framer",
    "PcmToUlaw",
    "resample_to_8k",
    "ulaw_decode",
    "ulaw_encode",
]

#: The telephony sample rate, in Hz.
@frozen
class AudioChunk:
    """
    A piece of synthesised audio as a TTS provider streams it: raw bytes with their format.
    `encoding` is "pcm16" (signed 16-bit little-endian mono) or "ulaw" (G.711 mu-law mono).
    """

    data: bytes
    encoding: str
    sample_rate: int


SAMPLE_RATE = 8000
#: 20 ms of 8 kHz mu-law: one Twilio media frame.
FRAME_BYTES = 160
#: One frame of mu-law silence (0xFF is positive zero).
SILENCE_FRAME = b"\xff" * FRAME_BYTES

# Accepted input rates. Rates whose ratio to 8 kHz needs more than _MAX_PHASES filter phases
# (e.g. 44,099 Hz) are refused: no TTS provider produces them, and the filter table would be big.
_MIN_RATE = 1000
_MAX_RATE = 192000
_MAX_PHASES = 400

# Filter design (see the module docstring).
_SPAN_SECONDS = 0.0045
_KAISER_BETA = 6.0
_CUTOFF = 0.475  # -6 dB point, as a fraction of the lower of the two rates

# Outputs computed per vectorised step: bounds the temporary (outputs x taps) matrix.
_BLOCK = 1024


def _build_encode_table() -> np.ndarray:
    """
    Encode every 16-bit sample as SPEC §12.3 describes, indexed by the sample's bit pattern.
    """
    x = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.int32)
    sign = np.where(x < 0, 0x80, 0x00)
    biased = np.minimum(np.abs(x), 32635) + 132
    # Position of the highest set bit, 14..7, as exponent 7..0.
    exponent = np.searchsorted(1 << np.arange(8, 15), biased, side="right")
    mantissa = (biased >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8)


def _build_decode_table() -> np.ndarray:
    """
    Decode every mu-law byte (PROVIDERS §6.1) to a 16-bit sample.
    """
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    magnitude = ((((u & 0x0F) << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


_ENCODE = _build_encode_table()
_DECODE = _build_decode_table()
_DECODE.flags.writeable = False
_ENCODE.flags.writeable = False


def _samples(pcm16le: bytes) -> np.ndarray:
    if len(pcm16le) % 2:
        raise ValueError(
            f"16-bit PCM must have an even number of bytes, got {len(pcm16le)}"
        )
    return np.frombuffer(pcm16le, dtype="<i2")


def _encode_samples(samples: np.ndarray) -> bytes:
    return _ENCODE[samples.astype(np.int16, copy=False).view(np.uint16)].tobytes()


def ulaw_encode(pcm16le: bytes) -> bytes:
    """
    Encode 16-bit little-endian PCM as G.711 mu-law, one byte per sample, exactly as SPEC §12.3.

    The magnitude of each sample is clipped to 32635, biased by 132 and quantised with the sign
    kept apart, so C{ulaw_encode(-x) == ulaw_encode(x) ^ 0x80} for every non-zero C{x} above
    -32768. C{audioop.lin2ulaw} first shifts the two's-complement sample right by two bits, which
    rounds negative samples away from zero: for the 381 negative inputs whose magnitude is within
    three of a quantisation boundary it returns the next larger magnitude (one code lower; -1
    becomes 0x7E, which decodes to -8, where this encoder gives 0x7F, which decodes to 0). Both
    are valid G.711 (the decode table is the same); this one is the plugin's, and symmetric.

    @raise ValueError: if C{pcm16le} has an odd number of bytes.
    """
    return _encode_samples(_samples(pcm16le))


def ulaw_decode(ulaw: bytes) -> bytes:
    """
    Decode G.711 mu-law to 16-bit little-endian PCM (two bytes per input byte).
    """
    return _DECODE[np.frombuffer(ulaw, dtype=np.uint8)].astype("<i2").tobytes()


@frozen(eq=False)
class _Kernel:
    """
    A polyphase low-pass filter for one rational rate change C{up/down}.

    Output C{n} sits at input position C{n * down / up} = C{base + phase / up}; it is the dot
    product of the input samples C{base - half + 1 .. base + half} with C{weights[phase]}.
    C{by_output[i]} is the row for every output C{n} with C{n % up == i}, repeated so that any
    L{_BLOCK} consecutive outputs find theirs as one contiguous slice.
    """

    up: int
    down: int
    half: int
    weights: np.ndarray  # (up, 2 * half) float32, every row summing to 1
    by_output: np.ndarray  # (_BLOCK + up, 2 * half), rows of weights


def _check_rate(rate: int) -> None:
    if (
        not isinstance(rate, int)
        or isinstance(rate, bool)
        or not _MIN_RATE <= rate <= _MAX_RATE
        or SAMPLE_RATE // gcd(rate, SAMPLE_RATE) > _MAX_PHASES
    ):
        raise ValueError(f"unsupported input sample rate: {rate!r}")


@functools.lru_cache(maxsize=8)
def _kernel_for(rate: int) -> _Kernel:
    g = gcd(rate, SAMPLE_RATE)
    up, down = SAMPLE_RATE // g, rate // g
    half = max(8, int(np.ceil(_SPAN_SECONDS * rate / 2)))
    cutoff = _CUTOFF * min(rate, SAMPLE_RATE) / rate  # cycles per input sample
    # t: distance in input samples from each phase's output position to each tap.
    t = np.arange(-half + 1, half + 1)[None, :] - (np.arange(up) / up)[:, None]
    window = np.i0(_KAISER_BETA * np.sqrt(np.clip(1.0 - (t / half) ** 2, 0.0, None)))
    h = np.sinc(2 * cutoff * t) * window
    h /= h.sum(axis=1, keepdims=True)
    weights = h.astype(np.float32)
    by_output = weights[np.arange(_BLOCK + up) * down % up] if up > 1 else weights
    weights.flags.writeable = by_output.flags.writeable = False
    return _Kernel(up=up, down=down, half=half, weights=weights, by_output=by_output)


@define
class _Resampler:
    """
    Stream 16-bit samples at C{rate} to 8 kHz with a L{_Kernel}.

    The buffer holds the input from absolute index C{_start} on (negative indices are the
    zeros before the stream); only the samples still needed by the next output are kept.
    """

    _kernel: _Kernel
    _buffer: np.ndarray
    _start: int
    _received: int = 0
    _next: int = 0

    @classmethod
    def for_rate(cls, rate: int) -> _Resampler:
        kernel = _kernel_for(rate)
        history = kernel.half - 1
        return cls(
            kernel=kernel, buffer=np.zeros(history, np.float32), start=-history
        )

    def process(self, samples: np.ndarray) -> np.ndarray:
        """
        Take more input; return the output samples whose whole filter window is now known.
        """
        k = self._kernel
        self._buffer = np.concatenate((self._buffer, samples.astype(np.float32)))
        self._received += len(samples)
        # Output n is ready when floor(n * down / up) + half <= received - 1.
        ahead = self._received - k.half
        ready = -(-ahead * k.up // k.down) if ahead > 0 else 0
        return self._emit(min(ready, self._received * k.up // k.down))

    def finish(self) -> np.ndarray:
        """
        End the input (zeros follow it); return the rest, up to C{floor(n * 8000 / rate)}.
        """
        k = self._kernel
        self._buffer = np.concatenate((self._buffer, np.zeros(k.half, np.float32)))
        return self._emit(self._received * k.up // k.down)

    def _emit(self, stop: int) -> np.ndarray:
        k = self._kernel
        if stop <= self._next:
            return np.zeros(0, np.int16)
        windows = sliding_window_view(self._buffer, 2 * k.half)
        out = []
        for first in range(self._next, stop, _BLOCK):
            last = min(first + _BLOCK, stop)
            if k.up == 1:
                # One phase: the windows are every down-th row of the view, no copy needed.
                row = first * k.down - (k.half - 1) - self._start
                rows = windows[row : row + (last - first - 1) * k.down + 1 : k.down]
                out.append(np.einsum("ij,j->i", rows, k.weights[0]))
            else:
                rows = np.arange(first, last, dtype=np.int64) * k.down // k.up
                rows -= (k.half - 1) + self._start
                phase = first % k.up
                weights = k.by_output[phase : phase + last - first]
                out.append(np.einsum("ij,ij->i", windows[rows], weights))
        self._next = stop
        drop = self._next * k.down // k.up - (k.half - 1) - self._start
        if drop > 0:
            self._buffer = self._buffer[drop:]
            self._start += drop
        y = np.rint(np.concatenate(out))
        return np.clip(y, -32768, 32767).astype(np.int16)


def resample_to_8k(pcm16le: bytes, rate: int) -> bytes:
    """
    Resample 16-bit little-endian mono PCM at C{rate} Hz to 8 kHz, in one go.

    The result has exactly C{floor(n * 8000 / rate)} samples for C{n} input samples. Input
    already at 8 kHz is returned unchanged (the very object).

    @raise ValueError: for an odd number of bytes or an unsupported rate.
    """
    _check_rate(rate)
    samples = _samples(pcm16le)
    if rate == SAMPLE_RATE:
        return pcm16le
    resampler = _Resampler.for_rate(rate)
    out = np.concatenate((resampler.process(samples), resampler.finish()))
    return out.astype("<i2").tobytes()


def _valid_rate(instance: object, attribute: object, rate: int) -> None:
    _check_rate(rate)


@define
class PcmToUlaw:
    """
    Convert one synthesis, 16-bit little-endian mono PCM at C{input_rate}, to 8 kHz mu-law as
    its chunks arrive.

    Chunks may have any length, odd ones included: a trailing odd byte waits for the next
    chunk. The concatenated output of L{feed} and L{flush} is byte-for-byte
    C{ulaw_encode(resample_to_8k(pcm, input_rate))} of the concatenated input. Memory is
    bounded by the last chunk plus a few milliseconds of filter history.
    """

    _input_rate: int = field(validator=_valid_rate)
    _resampler: _Resampler | None = field(init=False, default=None)
    _carry: bytes = field(init=False, default=b"")
    _finished: bool = field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        if self._input_rate != SAMPLE_RATE:
            self._resampler = _Resampler.for_rate(self._input_rate)

    def feed(self, chunk: bytes) -> bytes:
        """
        Take the next chunk of PCM; return the mu-law bytes ready so far (possibly C{b""}).

        @raise RuntimeError: after L{flush}.
        """
        if self._finished:
            raise RuntimeError("PcmToUlaw.feed() called after flush()")
        data = self._carry + chunk if self._carry else chunk
        if len(data) % 2:
            self._carry = bytes(data[-1:])
            data = data[:-1]
        else:
            self._carry = b""
        samples = np.frombuffer(data, dtype="<i2")
        if self._resampler is not None:
            samples = self._resampler.process(samples)
        return _encode_samples(samples)

    def flush(self) -> bytes:
        """
        End the stream; return the remaining mu-law bytes.

        A dangling odd byte at the very end is half a sample and is dropped. The converter
        cannot be fed after this; a second call returns C{b""}.
        """
        if self._finished:
            return b""
        self._finished = True
        self._carry = b""
        if self._resampler is None:
            return b""
        return _encode_samples(self._resampler.finish())


@define
class Framer:
    """
    Cut a mu-law byte stream into L{FRAME_BYTES}-byte (20 ms) frames.

    At most one partial frame (under 160 bytes) is held between calls.
    """

    _pending: bytearray = field(init=False, factory=bytearray)

    def feed(self, data: bytes) -> list[bytes]:
        """
        Add mu-law bytes; return every complete frame now available, in order.
        """
        self._pending += data
        whole = len(self._pending) - len(self._pending) % FRAME_BYTES
        if not whole:
            return []
        view = bytes(self._pending[:whole])
        del self._pending[:whole]
        return [view[i : i + FRAME_BYTES] for i in range(0, whole, FRAME_BYTES)]

    def flush(self, pad: bool = True) -> list[bytes]:
        """
        Return the held partial frame, if any: padded to a full frame with mu-law silence
        (0xFF), or as it is (shorter than a frame) when C{pad} is false.
        """
        if not self._pending:
            return []
        rest = bytes(self._pending)
        self._pending.clear()
        if pad:
            rest += b"\xff" * (FRAME_BYTES - len(rest))
        return [rest]
