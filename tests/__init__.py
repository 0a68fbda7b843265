"""voicecall tests (trial)."""
