"""
The call domain: records and events (model), the call state machine (manager), the voice it
speaks and listens through (voice), limits (policy), the durable store and the stale-call
reaper. It imports nothing of ours but itself and infra, and no surface or speech code; the
one exception, the manager's import of providers/base.py's Provider and ProviderError, is
listed in tests/test_layers.py until those move here.
"""
