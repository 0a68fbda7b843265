"""
The set-up the manager's unit tests share: a CallManager on a `Clock`, over a real CallStore
written synchronously, with the provider a test chooses as its voice; and, for the turn-order and
chaos tests, the whole call path against a fake carrier (`carrier_stack`, `answered_call`).

    rig = manager_rig(self, lambda clock: MockProvider(clock=clock), max_concurrent_calls=3)
    rig.manager.initiate(...)
    rig.clock.advance(5)
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from voicecall.domain.manager import CallManager, ManagerSettings
from voicecall.domain.store import CallStore
from voicecall.infra.dbwriter import SynchronousWriter
from voicecall.testing.stack import CALLEE, Stack

#: Where every rig's clock starts (a plausible Unix time, so timestamps look real).
EPOCH = 1_700_000_000
WEBHOOK_URL = "http://127.0.0.1:3334/voice/webhook"


def open_store(testcase, directory: str, writer=None) -> CallStore:
    """A CallStore on `directory` over `writer` (a SynchronousWriter unless given), open; closed at cleanup."""
    writer = writer or SynchronousWriter()
    store = CallStore(directory, writer)
    testcase.successResultOf(writer.start())
    testcase.successResultOf(store.open())
    testcase.addCleanup(lambda: testcase.successResultOf(store.close()))
    return store


def build_manager(provider, store: CallStore, clock, *, webhook_url: str = WEBHOOK_URL, on_utterance=None, **settings: Any) -> CallManager:
    """A CallManager speaking through `provider`, with ManagerSettings(provider "mock", from +15550000000, then `settings`)."""
    manager = CallManager(
        provider=provider,
        voice=provider,
        store=store,
        clock=clock,
        settings=ManagerSettings(**{"provider_name": "mock", "from_number": "+15550000000", **settings}),
        on_utterance=on_utterance,
    )
    manager.set_webhook_url(webhook_url)
    return manager


@frozen
class ManagerRig:
    clock: Clock
    directory: str
    store: CallStore
    provider: Any
    manager: CallManager


def manager_rig(testcase, make_provider: Callable[[Clock], Any], **settings: Any) -> ManagerRig:
    """A Clock at EPOCH, a fresh store in `testcase.mktemp()`, `make_provider(clock)` and a manager on them."""
    clock = Clock()
    clock.advance(EPOCH)
    directory = testcase.mktemp()
    store = open_store(testcase, directory)
    provider = make_provider(clock)
    return ManagerRig(clock, directory, store, provider, build_manager(provider, store, clock, **settings))


def carrier_stack(testcase, provider: str, chaos=None, *, transcript_timeout_ms: int, prefix: str = "vc-stack-") -> Stack:
    """
    The daemon's call path in memory against `provider`'s fake carrier (voicecall.testing.stack),
    in a fresh directory (in memory where /dev/shm exists); closed and removed at cleanup.
    """
    directory = tempfile.mkdtemp(prefix=prefix, dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    testcase.addCleanup(shutil.rmtree, directory, True)
    stack = Stack.build(provider, directory, chaos, transcript_timeout_ms=transcript_timeout_ms)
    testcase.addCleanup(stack.close)
    return stack


def answered_call(testcase, stack: Stack):
    """A conversation call on `stack` whose greeting has played (its CallRecord)."""
    d = Deferred.fromCoroutine(stack.manager.initiate(CALLEE, "Hello, who is this?", "conversation"))
    stack.advance(4)
    return testcase.successResultOf(d)
