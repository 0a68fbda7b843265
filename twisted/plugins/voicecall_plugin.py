"""twistd plugin: `twistd voicecall`. Kept import-light; everything real is in voicecall.tap."""
from twisted.application.service import ServiceMaker

voicecall = ServiceMaker(
    "voicecall",
    "voicecall.tap",
    "Telephony daemon: carrier webhooks, media streams and a JSON-RPC control socket",
    "voicecall",
)
