"""Twilio media streams: the WebSocket server and paced outbound playback."""
