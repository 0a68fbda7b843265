"""
The only place in voicecall that touches private Twisted and autobahn names (DESIGN.md).

Each module checks the names it uses at import, on throw-away objects, and when one is missing
or behaves differently it logs that once and falls back to a public path: ws.py (the WebSocket
fast paths: framing, unmasking, direct writes, send-buffer reads, timers), http.py (the
webhook channel's view of Twisted's HTTP parser) and client.py (the connection under a client
response, which the JSON client drops when a body stalls). tests/test_private_ws.py and
tests/test_private_http.py pin every name; setup.cfg bounds twisted and autobahn to the major
versions they were verified against.
"""
