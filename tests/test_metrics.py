"""The Prometheus endpoint of a running daemon: call, webhook and latency metrics."""
from __future__ import annotations

import json

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
