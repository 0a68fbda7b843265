"""
Micro-benchmark: TTS PCM -> 8 kHz mu-law -> 160-byte frames, as playback does it.

For each input rate, converts SECONDS of 16-bit mono PCM fed in CHUNK-byte pieces through
voicecall.infra.audio.PcmToUlaw and Framer, and prints the real-time factor (seconds of audio converted
per second of CPU time; DESIGN.md target: at least 200x) and how much input audio the converter
needs before it releases its first full 20 ms frame (fed in 1 ms pieces).

Run:  .venv/bin/python benchmarks/audio_convert.py [--seconds 60] [--chunk 4096] [--cpu N]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from voicecall.infra.audio import FRAME_BYTES, Framer, PcmToUlaw, ulaw_encode

TARGET = 200.0
RATES = (24000, 22050, 16000, 44100, 48000, 8000)


def synth(rate: int, seconds: float) -> bytes:
    """Speech-band test signal: a few modulated tones over noise, 16-bit little-endian."""
    rng = np.random.default_rng(rate)
    t = np.arange(int(rate * seconds)) / rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    x = envelope * (4000 * np.sin(2 * np.pi * 220 * t) + 2500 * np.sin(2 * np.pi * 1870 * t))
    x += rng.normal(0.0, 1500.0, len(t))
    return np.clip(np.round(x), -32768, 32767).astype("<i2").tobytes()


def convert(rate: int, data: bytes, chunk: int) -> int:
    """Convert and frame C{data} in C{chunk}-byte pieces; return the number of frames."""
    converter, framer, frames = PcmToUlaw(rate), Framer(), 0
    for i in range(0, len(data), chunk):
        frames += len(framer.feed(converter.feed(data[i : i + chunk])))
    frames += len(framer.feed(converter.flush()))
    return frames + len(framer.flush())


def first_frame_ms(rate: int) -> float:
    """Milliseconds of input audio fed (1 ms at a time) before the first full frame is out."""
    step = max(1, rate // 1000) * 2
    data = synth(rate, 0.5)
    converter, framer = PcmToUlaw(rate), Framer()
    for i in range(0, len(data), step):
        if framer.feed(converter.feed(data[i : i + step])):
            return (i + step) / 2 / rate * 1000
    return float("nan")


def measure(rate: int, seconds: float, chunk: int, repeat: int) -> tuple[int, float, float]:
    """Best-of-C{repeat} CPU and wall seconds for one conversion, and the frame count."""
    data = synth(rate, seconds)
    best_cpu = best_wall = float("inf")
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        frames = convert(rate, data, chunk)
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    return frames, best_cpu, best_wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--seconds", type=float, default=60.0, help="audio per rate (60)")
    parser.add_argument("--chunk", type=int, default=4096, help="bytes per feed (4096)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per rate, best kept (3)")
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU first")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})

    convert(24000, synth(24000, 1.0), args.chunk)  # warm the filter cache and numpy
    print(
        f"audio conversion: {args.seconds:g} s of PCM16 per rate, {args.chunk}-byte chunks, "
        f"PcmToUlaw + Framer, best of {args.repeat}, target >= {TARGET:g}x real time"
    )
    print(f"{'rate_hz':>8} {'frames':>7} {'cpu_ms':>8} {'wall_ms':>8} {'x_realtime':>11}"
          f" {'first_frame_after_ms':>21}  verdict")
    worst = float("inf")
    for rate in RATES:
        frames, cpu, wall = measure(rate, args.seconds, args.chunk, args.repeat)
        factor = args.seconds / max(cpu, 1e-9)
        worst = min(worst, factor)
        verdict = "ok" if factor >= TARGET else "BELOW TARGET"
        print(f"{rate:>8} {frames:>7} {cpu * 1000:>8.1f} {wall * 1000:>8.1f} {factor:>10.0f}x"
              f" {first_frame_ms(rate):>21.1f}  {verdict}")

    ulaw = synth(8000, args.seconds)
    start = time.process_time()
    ulaw_encode(ulaw)
    encode = args.seconds / max(time.process_time() - start, 1e-9)
    print(f"mu-law encode alone (one shot, 8 kHz): {encode:,.0f}x real time")
    print(f"slowest rate: {worst:,.0f}x real time; frames are {FRAME_BYTES} bytes (20 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
