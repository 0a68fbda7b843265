"""The voicecall benchmarks (loopback only); `python -m benchmarks` runs them all."""
