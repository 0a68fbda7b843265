"""
The call domain: records and events (model), the call state machine (manager), limits
(policy), the durable store and the stale-call reaper. Imports no surface, provider or speech code.
"""
