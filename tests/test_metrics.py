"""The Prometheus endpoint of a running daemon: call, webhook and latency metrics."""
from __future__ import annotations

import json

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.harness import eventually, free_port, http_client, start_daemon


class MetricsEndpointTests(TestCase):
    timeout = 30

    async def test_scrape(self):
        """The metrics listener reports active calls by state and webhook requests by result."""
        port = free_port()
        service, rpc = await start_daemon(
            self, {"provider": "mock", "maxConcurrentCalls": 3, "metrics": {"enabled": True, "port": port}}
        )
        http = http_client(self)
        call_id = (await rpc.call("voicecall.initiate", {"to": "+15550001234", "message": "Hi", "mode": "conversation"}))["callId"]
        body = json.dumps({"event": {"type": "call.answered", "callId": call_id}}).encode()
        for _ in range(2):  # the second delivery is a replay
            await (await http.post(service.webhook_url, data=body)).content()
        await (await http.get(service.webhook_url)).content()
        async def listening():  # the greeting is spoken after the webhook is answered
            return (await rpc.call("voicecall.status", {"callId": call_id}))["call"]["state"] == "listening"

        await eventually(listening, 10, "the call to listen after its greeting")
        response = await http.get(f"http://127.0.0.1:{port}/metrics")
        self.assertEqual(response.code, 200)
        text = (await response.text()).splitlines()
        self.assertIn('voicecall_calls_active{provider="mock",state="listening"} 1.0', text)
        self.assertIn('voicecall_webhook_requests_total{result="ok"} 1.0', text)
        self.assertIn('voicecall_webhook_requests_total{result="replay"} 1.0', text)
        self.assertIn('voicecall_webhook_requests_total{result="405"} 1.0', text)
        self.assertTrue(any(line.startswith("voicecall_turn_latency_seconds_bucket") for line in text))
        await rpc.call("voicecall.end", {"callId": call_id})
        text = await (await http.get(f"http://127.0.0.1:{port}/metrics")).text()
        self.assertIn('voicecall_calls_ended_total{provider="mock",reason="hangup-bot"} 1.0', text)

    async def test_disabled_by_default(self):
        """Without metrics.enabled nothing listens for metrics."""
        service, _ = await start_daemon(self, {"provider": "mock"})
        self.assertNotIn("metrics", [s.name for s in service])

    async def test_refused_webhooks_counted_by_status(self):
        """
        A webhook answered 4xx after its body was read (a mock body it cannot use: 400, an unknown
        callId: 404) is counted under its status, not as "ok".
        """
        port = free_port()
        service, _ = await start_daemon(self, {"provider": "mock", "metrics": {"enabled": True, "port": port}})
        http = http_client(self)
        for body in ({}, {"event": {"id": "ev-1", "type": "call.answered", "callId": "nope"}}):
            response = await http.post(service.webhook_url, data=json.dumps(body).encode())
            await response.content()
        text = (await (await http.get(f"http://127.0.0.1:{port}/metrics")).text()).splitlines()
        self.assertIn('voicecall_webhook_requests_total{result="400"} 1.0', text)
        self.assertIn('voicecall_webhook_requests_total{result="404"} 1.0', text)
        self.assertNotIn('voicecall_webhook_requests_total{result="ok"} 1.0', text)

    async def test_scrapes_are_not_logged(self):
        """Prometheus scrapes every few seconds: a scrape writes no access-log line to the daemon's log."""
        port = free_port()
        await start_daemon(self, {"provider": "mock", "metrics": {"enabled": True, "port": port}})
        logged: list[str] = []
        observer = lambda event: logged.append(formatEvent(event) or "")  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        http = http_client(self)
        response = await http.get(f"http://127.0.0.1:{port}/metrics")
        self.assertEqual(response.code, 200)
        await response.content()
        self.assertEqual([line for line in logged if "/metrics" in line], [])
