"""
Twilio media streams: the WebSocket wire (sockets), the stream sessions (stream), paced
outbound playback, and the bridge that joins a stream to its call.
"""
