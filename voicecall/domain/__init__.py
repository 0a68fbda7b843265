"""
The call domain: records and events (model), the call state machine (manager), the interfaces
it drives a carrier through (carrier: call control; voice: speaking and listening), limits
(policy), the durable store and the stale-call reaper. It imports nothing of ours but itself and
infra (tests/test_layers.py): providers/ implements its interfaces and tap.py wires them in.
"""
