"""
Infrastructure with no knowledge of calls: G.711 audio, bounded containers, child
processes, the store's writer thread, systemd notification, a bounded JSON HTTP client
(jsonhttp: the carriers' REST calls and the responder's), and wsfast, the WebSocket fast
paths (framing, unmasking, direct writes, timers): the one module that touches autobahn's and
Twisted's private names. It imports nothing of voicecall outside infra (tests/test_layers.py).
"""
