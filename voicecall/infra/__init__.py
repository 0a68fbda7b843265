"""
Infrastructure with no knowledge of calls: G.711 audio, bounded containers, child
processes, the store's writer thread, systemd notification, a bounded JSON HTTP client
(jsonhttp: the carriers' REST calls and the responder's) and its size-capped body reader
(bodies, which the fake carriers read webhook answers with too), and private/, the one package that
touches autobahn's and Twisted's private names (ws.py, the WebSocket fast paths; http.py, the
webhook channel's view of Twisted's HTTP parser; client.py, a client response's connection). It imports nothing of voicecall outside infra (tests/test_layers.py).
"""
