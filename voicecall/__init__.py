"""voicecall: a Twisted telephony daemon that gives an AI assistant a phone."""

__version__ = "0.1.0"
