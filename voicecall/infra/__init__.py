"""
Infrastructure with no knowledge of calls: G.711 audio, bounded containers, child
processes, the store's writer thread, systemd notification, WebSocket framing and timers.
"""
