"""
Tests for voicecall.web.security: public-URL reconstruction (SPEC §9.1, [H] rules), the ngrok
free-tier loopback rule (SPEC §9.5) and forwarded client addresses, plus the SPEC §19
"webhook-security.test" scenarios run end to end through the provider signature checks, with
signatures made by the carriers' official SDKs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from hypothesis import given, settings, strategies as st
from plivo.utils import validate_signature as plivo_validate_v2
from plivo.utils import signature_v3
from twilio.request_validator import RequestValidator
from twisted.trial.unittest import SynchronousTestCase

from voicecall.providers.signatures import replace_origin, verify_plivo, verify_twilio
from voicecall.web.security import (
    ForwardingPolicy,
    extract_hostname,
    header_value,
    is_loopback,
    normalize_ip,
)

TWILIO_TOKEN = "test_auth_token_0123456789abcdef"
PLIVO_TOKEN = "MAXXXXXXXXXXXXXXXXXX_test_token"
PARAMS = [("CallSid", "CA11111111111111111111111111111111"), ("CallStatus", "ringing")]


def twilio_sdk_signature(url: str, params=PARAMS) -> str:
    """The signature Twilio's own SDK computes for `url` and `params`."""
    return RequestValidator(TWILIO_TOKEN).compute_signature(url, dict(params))


def plivo_v3_sdk_signature(method: str, url: str, params: dict, nonce: str) -> str:
    """The V3 signature Plivo's SDK computes for a request."""
    if method == "GET":
        base = signature_v3.construct_get_url(url, dict(params))
    else:
        base = signature_v3.construct_post_url(url, dict(params))
    return signature_v3.get_signature_v3(
        PLIVO_TOKEN.encode(), base.decode(), nonce.encode()
    ).decode()


class HeaderValueTests(SynchronousTestCase):
    """header_value finds headers case-insensitively and takes first values."""

    def test_exact_lower_case_key(self):
        """A lower-case key is found directly."""
        self.assertEqual(header_value({"host": "a.example"}, "Host"), "a.example")

    def test_case_insensitive(self):
        """A key in another case is found too."""
        self.assertEqual(
            header_value({"X-Forwarded-Host": "b.example"}, "x-forwarded-host"), "b.example"
        )

    def test_exact_key_wins(self):
        """The exact lower-case key wins over another spelling of the same name."""
        headers = {"HOST": "upper.example", "host": "lower.example"}
        self.assertEqual(header_value(headers, "host"), "lower.example")

    def test_list_gives_first(self):
        """A list value gives its first element."""
        self.assertEqual(
            header_value({"host": ["one.example", "two.example"]}, "host"), "one.example"
        )

    def test_missing(self):
        """A missing header or an empty list gives None."""
        self.assertIsNone(header_value({}, "host"))
        self.assertIsNone(header_value({"host": []}, "host"))


class NormalizeIpTests(SynchronousTestCase):
    """normalize_ip puts addresses in a comparable form."""

    def test_ipv4_mapped(self):
        """An IPv4-mapped IPv6 address becomes the plain IPv4 address."""
        self.assertEqual(normalize_ip("::ffff:203.0.113.7"), "203.0.113.7")
        self.assertEqual(normalize_ip("[::FFFF:203.0.113.7]"), "203.0.113.7")

    def test_brackets_and_case(self):
        """Brackets are stripped and IPv6 is lower-cased and canonical."""
        self.assertEqual(normalize_ip(" [2001:DB8::1] "), "2001:db8::1")
        self.assertEqual(normalize_ip("0:0:0:0:0:0:0:1"), "::1")

    def test_plain(self):
        """A plain IPv4 address is unchanged."""
        self.assertEqual(normalize_ip("10.0.0.1"), "10.0.0.1")

    def test_blank(self):
        """None and blank values give None."""
        self.assertIsNone(normalize_ip(None))
        self.assertIsNone(normalize_ip("  "))
        self.assertIsNone(normalize_ip("[]"))

    def test_not_an_address(self):
        """Text that is not an address is only trimmed and lower-cased."""
        self.assertEqual(normalize_ip(" Proxy.Local "), "proxy.local")


class IsLoopbackTests(SynchronousTestCase):
    """is_loopback recognises this host's addresses only."""

    def test_loopback(self):
        """IPv4 and IPv6 loopback, mapped loopback and localhost are loopback."""
        for ip in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "::ffff:127.0.0.1", "localhost"):
            self.assertTrue(is_loopback(ip), ip)

    def test_not_loopback(self):
        """Other addresses, garbage and a missing address are not loopback."""
        for ip in ("10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1", "127.0.0.1.evil", "", None):
            self.assertFalse(is_loopback(ip), ip)


class ExtractHostnameTests(SynchronousTestCase):
    """extract_hostname applies SPEC §9.1 step 4."""

    def test_port_dropped_and_lower_cased(self):
        """The port is dropped and the name lower-cased."""
        self.assertEqual(extract_hostname("Example.COM:8443"), "example.com")

    def test_ipv6(self):
        """A bracketed IPv6 address gives the inner address, lower-cased, port dropped."""
        self.assertEqual(extract_hostname("[2001:DB8::1]:8080"), "2001:db8::1")
        self.assertEqual(extract_hostname("[::1]"), "::1")

    def test_bad_ipv6(self):
        """Unclosed brackets, junk after them or a non-address inside are rejected."""
        for value in ("[::1", "[::1]junk", "[evil.com]", "[::1]:80/x"):
            self.assertIsNone(extract_hostname(value), value)

    def test_at_sign_rejected(self):
        """Values holding '@' are rejected."""
        self.assertIsNone(extract_hostname("good.example@evil.example"))
        self.assertIsNone(extract_hostname("user:pass@evil.example"))

    def test_invalid_hostnames(self):
        """Names that break RFC 1123 are rejected."""
        for value in (
            "-bad.example",
            "bad-.example",
            "a_b.example",
            "a b",
            "evil.example/x",
            "",
            ".x",
        ):
            self.assertIsNone(extract_hostname(value), value)

    def test_lengths(self):
        """Labels of 63 and names of 253 characters pass; 64 and 254 do not."""
        label63 = "a" * 63
        self.assertEqual(extract_hostname(label63 + ".example"), label63 + ".example")
        self.assertIsNone(extract_hostname("a" * 64 + ".example"))
        name253 = ".".join(["a" * 63] * 3 + ["b" * 61])
        self.assertEqual(len(name253), 253)
        self.assertEqual(extract_hostname(name253), name253)
        self.assertIsNone(extract_hostname(name253 + "c"))


class ReconstructUrlTests(SynchronousTestCase):
    """ForwardingPolicy.reconstruct_url builds the URL a carrier signed (SPEC §9.1, §19)."""

    ATTACK = {
        "host": "localhost:3334",
        "x-forwarded-host": "evil.example",
        "x-forwarded-proto": "http",
    }

    def test_default_uses_host_header(self):
        """By default the Host header (port dropped) and https are used."""
        url = ForwardingPolicy().reconstruct_url(
            "/voice/webhook?callId=abc", {"host": "Example.com:8080"}, "1.2.3.4"
        )
        self.assertEqual(url, "https://example.com/voice/webhook?callId=abc")

    def test_path_and_query_kept_verbatim(self):
        """The path and query are kept exactly as received, escapes included."""
        target = "/voice/web%2Fhook?a=%20b+c&d=%E2%9C%93&e"
        url = ForwardingPolicy().reconstruct_url(target, {"host": "example.com"}, None)
        self.assertEqual(url, "https://example.com" + target)

    def test_empty_trailing_question_mark_dropped(self):
        """An empty query's '?' is dropped like WHATWG URL serialisation does."""
        url = ForwardingPolicy().reconstruct_url("/voice?", {"host": "example.com"}, None)
        self.assertEqual(url, "https://example.com/voice")

    def test_empty_target(self):
        """An empty target becomes '/'."""
        self.assertEqual(
            ForwardingPolicy().reconstruct_url("", {"host": "example.com"}, None),
            "https://example.com/",
        )

    def test_attacker_forwarded_host_ignored_by_default(self):
        """X-Forwarded-Host and -Proto are ignored without allowedHosts/trustForwardingHeaders."""
        url = ForwardingPolicy().reconstruct_url("/voice/webhook", self.ATTACK, "10.0.0.1")
        self.assertEqual(url, "https://localhost/voice/webhook")

    def test_allowed_hosts_without_trusted_proxies_ignored(self):
        """allowedHosts alone no longer enables forwarded headers ([H])."""
        policy = ForwardingPolicy(allowed_hosts=("evil.example",))
        url = policy.reconstruct_url("/voice/webhook", self.ATTACK, "10.0.0.1")
        self.assertEqual(url, "https://localhost/voice/webhook")

    def test_trust_without_trusted_proxies_ignored(self):
        """trustForwardingHeaders with an empty trusted proxy list trusts nothing ([H])."""
        policy = ForwardingPolicy(trust_forwarding_headers=True)
        url = policy.reconstruct_url("/voice/webhook", self.ATTACK, "10.0.0.1")
        self.assertEqual(url, "https://localhost/voice/webhook")

    def test_allowed_host_from_trusted_proxy(self):
        """A forwarded host in allowedHosts from a trusted proxy is used, with its proto."""
        policy = ForwardingPolicy(
            allowed_hosts=("Voice.Example.com",), trusted_proxy_ips=("10.0.0.1",)
        )
        headers = {
            "host": "localhost",
            "x-forwarded-host": "voice.example.com",
            "x-forwarded-proto": "http",
        }
        url = policy.reconstruct_url("/voice/webhook", headers, "10.0.0.1")
        self.assertEqual(url, "http://voice.example.com/voice/webhook")

    def test_forwarded_host_not_allowed_falls_back(self):
        """A forwarded host missing from allowedHosts falls back to the Host header."""
        policy = ForwardingPolicy(
            allowed_hosts=("voice.example.com",), trusted_proxy_ips=("10.0.0.1",)
        )
        headers = {"host": "localhost:3334", "x-forwarded-host": "evil.example"}
        url = policy.reconstruct_url("/voice/webhook", headers, "10.0.0.1")
        self.assertEqual(url, "https://localhost/voice/webhook")

    def test_invalid_allowed_hosts_fail_closed(self):
        """An allowedHosts list without one valid entry accepts no forwarded host."""
        policy = ForwardingPolicy(
            allowed_hosts=("bad host",),
            trust_forwarding_headers=True,
            trusted_proxy_ips=("10.0.0.1",),
        )
        url = policy.reconstruct_url("/voice/webhook", self.ATTACK, "10.0.0.1")
        self.assertEqual(url, "http://localhost/voice/webhook")

    def test_trusted_forwarding(self):
        """trustForwardingHeaders plus a trusted proxy uses the forwarded URL."""
        policy = ForwardingPolicy(trust_forwarding_headers=True, trusted_proxy_ips=("10.0.0.1",))
        url = policy.reconstruct_url("/voice/webhook?x=1", self.ATTACK, "10.0.0.1")
        self.assertEqual(url, "http://evil.example/voice/webhook?x=1")

    def test_ipv4_mapped_remote_matches(self):
        """An IPv4-mapped remote IP matches a plain trusted proxy entry."""
        policy = ForwardingPolicy(
            trust_forwarding_headers=True, trusted_proxy_ips=("203.0.113.10",)
        )
        url = policy.reconstruct_url(
            "/v", {"host": "localhost", "x-forwarded-host": "pub.example"}, "::ffff:203.0.113.10"
        )
        self.assertEqual(url, "https://pub.example/v")

    def test_ipv4_mapped_proxy_entry_matches(self):
        """An IPv4-mapped trusted proxy entry matches a plain remote IP."""
        policy = ForwardingPolicy(
            trust_forwarding_headers=True, trusted_proxy_ips=("::ffff:203.0.113.10",)
        )
        url = policy.reconstruct_url(
            "/v", {"host": "localhost", "x-forwarded-host": "pub.example"}, "203.0.113.10"
        )
        self.assertEqual(url, "https://pub.example/v")

    def test_remote_not_trusted(self):
        """A remote IP outside the trusted list gets no forwarding."""
        policy = ForwardingPolicy(
            trust_forwarding_headers=True, trusted_proxy_ips=("203.0.113.10",)
        )
        url = policy.reconstruct_url(
            "/v", {"host": "localhost", "x-forwarded-host": "pub.example"}, "203.0.113.11"
        )
        self.assertEqual(url, "https://localhost/v")

    def test_missing_remote_never_trusted(self):
        """A trusted list with no remote IP gets no forwarding."""
        policy = ForwardingPolicy(
            trust_forwarding_headers=True, trusted_proxy_ips=("203.0.113.10",)
        )
        url = policy.reconstruct_url(
            "/v", {"host": "localhost", "x-forwarded-host": "pub.example"}, None
        )
        self.assertEqual(url, "https://localhost/v")

    def test_forwarded_proto_exact(self):
        """Only exactly 'http' or 'https' is taken from X-Forwarded-Proto."""
        policy = ForwardingPolicy(trust_forwarding_headers=True, trusted_proxy_ips=("10.0.0.1",))
        for proto in ("HTTP", "ftp", "http, https", "javascript"):
            url = policy.reconstruct_url(
                "/v", {"host": "h.example", "x-forwarded-proto": proto}, "10.0.0.1"
            )
            self.assertEqual(url, "https://h.example/v", proto)

    def test_forwarded_header_order(self):
        """X-Forwarded-Host, X-Original-Host, Ngrok-Forwarded-Host go in order, bad ones skipped."""
        policy = ForwardingPolicy(trust_forwarding_headers=True, trusted_proxy_ips=("10.0.0.1",))
        headers = {
            "host": "h.example",
            "x-original-host": "orig.example",
            "ngrok-forwarded-host": "ngrok.example",
        }
        self.assertEqual(
            policy.reconstruct_url("/v", headers, "10.0.0.1"), "https://orig.example/v"
        )
        headers["x-forwarded-host"] = "bad@host"
        self.assertEqual(
            policy.reconstruct_url("/v", headers, "10.0.0.1"), "https://orig.example/v"
        )
        del headers["x-original-host"]
        self.assertEqual(
            policy.reconstruct_url("/v", headers, "10.0.0.1"), "https://ngrok.example/v"
        )

    def test_forwarded_host_first_element(self):
        """Only the first comma-separated forwarded host is considered, its port dropped."""
        policy = ForwardingPolicy(trust_forwarding_headers=True, trusted_proxy_ips=("10.0.0.1",))
        headers = {"host": "h.example", "x-forwarded-host": "first.example:8443, second.example"}
        self.assertEqual(
            policy.reconstruct_url("/v", headers, "10.0.0.1"), "https://first.example/v"
        )

    def test_at_sign_in_host_rejected(self):
        """A Host header holding '@' is not used, so it cannot smuggle another host into the URL."""
        url = ForwardingPolicy().reconstruct_url("/v", {"host": "good.example@evil.example"}, None)
        self.assertEqual(url, "https:///v")

    def test_at_sign_in_forwarded_host_rejected(self):
        """A forwarded host holding '@' is skipped even from a trusted proxy."""
        policy = ForwardingPolicy(trust_forwarding_headers=True, trusted_proxy_ips=("10.0.0.1",))
        headers = {"host": "h.example", "x-forwarded-host": "good.example@evil.example"}
        self.assertEqual(policy.reconstruct_url("/v", headers, "10.0.0.1"), "https://h.example/v")

    def test_ipv6_host(self):
        """An IPv6 Host is written back between brackets, port dropped."""
        url = ForwardingPolicy().reconstruct_url("/v", {"host": "[2001:db8::1]:3334"}, None)
        self.assertEqual(url, "https://[2001:db8::1]/v")

    def test_absolute_form_target(self):
        """An absolute-form target supplies the path, and the host when Host is missing."""
        policy = ForwardingPolicy()
        self.assertEqual(
            policy.reconstruct_url("http://Target.example:80/v?q=1", {}, None),
            "https://target.example/v?q=1",
        )
        self.assertEqual(
            policy.reconstruct_url("http://target.example/v", {"host": "host.example"}, None),
            "https://host.example/v",
        )

    def test_no_host(self):
        """Without any usable host the host is empty."""
        self.assertEqual(ForwardingPolicy().reconstruct_url("/v", {}, None), "https:///v")

    def test_ngrok_loopback_trusts_forwarding_for_twilio(self):
        """The effective ngrok flag trusts forwarded headers from a loopback peer for Twilio."""
        policy = ForwardingPolicy(ngrok_loopback_bypass=True)
        headers = {"host": "localhost:3334", "x-forwarded-host": "abc.ngrok-free.app"}
        for peer in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
            url = policy.reconstruct_url("/voice/webhook", headers, peer, for_twilio=True)
            self.assertEqual(url, "https://abc.ngrok-free.app/voice/webhook", peer)

    def test_ngrok_loopback_not_for_other_peers(self):
        """The ngrok rule does not trust non-loopback or missing peers."""
        policy = ForwardingPolicy(ngrok_loopback_bypass=True)
        headers = {"host": "localhost:3334", "x-forwarded-host": "abc.ngrok-free.app"}
        for peer in ("10.0.0.1", "::ffff:10.0.0.1", None):
            url = policy.reconstruct_url("/voice/webhook", headers, peer, for_twilio=True)
            self.assertEqual(url, "https://localhost/voice/webhook", peer)

    def test_ngrok_loopback_only_for_twilio(self):
        """The ngrok rule does not apply to other providers (Plivo has no ngrok mode)."""
        policy = ForwardingPolicy(ngrok_loopback_bypass=True)
        headers = {"host": "localhost:3334", "x-forwarded-host": "abc.ngrok-free.app"}
        self.assertEqual(
            policy.reconstruct_url("/voice/webhook", headers, "127.0.0.1"),
            "https://localhost/voice/webhook",
        )

    def test_ngrok_loopback_needs_flag(self):
        """Without the effective flag a loopback peer gets no forwarding."""
        headers = {"host": "localhost:3334", "x-forwarded-host": "abc.ngrok-free.app"}
        url = ForwardingPolicy().reconstruct_url(
            "/voice/webhook", headers, "127.0.0.1", for_twilio=True
        )
        self.assertEqual(url, "https://localhost/voice/webhook")

    def test_ngrok_loopback_respects_allowed_hosts(self):
        """Under the ngrok rule a configured allowedHosts list still filters forwarded hosts."""
        policy = ForwardingPolicy(allowed_hosts=("abc.ngrok-free.app",), ngrok_loopback_bypass=True)
        headers = {"host": "localhost", "x-forwarded-host": "evil.example"}
        url = policy.reconstruct_url("/v", headers, "127.0.0.1", for_twilio=True)
        self.assertEqual(url, "https://localhost/v")

    def test_lists_converted(self):
        """Lists given for the host and proxy settings are stored as tuples."""
        policy = ForwardingPolicy(allowed_hosts=["a.example"], trusted_proxy_ips=["10.0.0.1"])
        self.assertEqual(
            (policy.allowed_hosts, policy.trusted_proxy_ips), (("a.example",), ("10.0.0.1",))
        )


class ClientIpTests(SynchronousTestCase):
    """ForwardingPolicy.client_ip gives the address used for per-IP limits."""

    HEADERS = {"x-forwarded-for": "198.51.100.7, 10.0.0.1", "x-real-ip": "198.51.100.8"}

    def test_untrusted_uses_peer(self):
        """Without trusted forwarding the normalised peer address is used."""
        self.assertEqual(ForwardingPolicy().client_ip(self.HEADERS, "::ffff:10.0.0.1"), "10.0.0.1")

    def test_trusted_uses_forwarded_for(self):
        """From a trusted proxy the rightmost X-Forwarded-For hop that is not a trusted proxy is used."""
        policy = ForwardingPolicy(trust_forwarding_headers=True, trusted_proxy_ips=("10.0.0.1",))
        self.assertEqual(policy.client_ip(self.HEADERS, "10.0.0.1"), "198.51.100.7")

    def test_trusted_proxy_alone_is_enough(self):
        """The client address needs only a trusted peer (it picks a bucket; it authenticates nothing)."""
        policy = ForwardingPolicy(trusted_proxy_ips=("127.0.0.1",))
        self.assertEqual(policy.client_ip({"x-forwarded-for": "198.51.100.7"}, "127.0.0.1"), "198.51.100.7")
        self.assertEqual(policy.client_ip({}, "127.0.0.1"), "127.0.0.1")

    def test_client_written_hops_are_ignored(self):
        """Hops left of the one the trusted proxy saw are the client's own text: a spoofed first element does not count."""
        policy = ForwardingPolicy(trusted_proxy_ips=("10.0.0.1", "10.0.0.2"))
        headers = {"x-forwarded-for": "1.2.3.4, 203.0.113.9, 10.0.0.2"}
        self.assertEqual(policy.client_ip(headers, "10.0.0.1"), "203.0.113.9")
        self.assertEqual(policy.client_ip({"x-forwarded-for": "junk, 203.0.113.9"}, "10.0.0.1"), "203.0.113.9")
        self.assertEqual(policy.client_ip({"x-forwarded-for": "10.0.0.2"}, "10.0.0.1"), "10.0.0.2")

    def test_real_ip_fallback(self):
        """X-Real-IP is used when X-Forwarded-For is missing or not an address."""
        policy = ForwardingPolicy(trust_forwarding_headers=True, trusted_proxy_ips=("10.0.0.1",))
        self.assertEqual(
            policy.client_ip({"x-real-ip": "198.51.100.8"}, "10.0.0.1"), "198.51.100.8"
        )
        headers = {"x-forwarded-for": "not-an-ip", "x-real-ip": "[::FFFF:198.51.100.8]"}
        self.assertEqual(policy.client_ip(headers, "10.0.0.1"), "198.51.100.8")

    def test_untrusted_peer_of_trusting_policy(self):
        """A peer outside the trusted list cannot choose its client address."""
        policy = ForwardingPolicy(trust_forwarding_headers=True, trusted_proxy_ips=("10.0.0.1",))
        self.assertEqual(policy.client_ip(self.HEADERS, "10.0.0.2"), "10.0.0.2")

    def test_missing_peer(self):
        """A missing peer address gives one shared empty bucket."""
        self.assertEqual(ForwardingPolicy().client_ip({}, None), "")


class WebhookSecurityTests(SynchronousTestCase):
    """The SPEC §19 webhook-security scenarios: URL reconstruction feeding signature checks."""

    def twilio(self, policy, target, headers, peer, signature, public_url=None):
        url = policy.reconstruct_url(target, headers, peer, for_twilio=True)
        if public_url:
            url = replace_origin(public_url, url)
        return verify_twilio(
            url=url,
            params=PARAMS,
            signature=signature,
            auth_token=TWILIO_TOKEN,
        )

    def test_plivo_v2_reconstructed_url(self):
        """Plivo V2 (when allowed) verifies over Host plus a trusted X-Forwarded-Proto, the query ignored."""
        nonce = "05429567804466091622"
        signed = "http://example.com/plivo/voice"
        mac = hmac.new(PLIVO_TOKEN.encode(), (signed + nonce).encode(), hashlib.sha256).digest()
        signature = base64.b64encode(mac).decode()
        self.assertTrue(plivo_validate_v2(signed + "?flow=answer", nonce, signature, PLIVO_TOKEN))
        policy = ForwardingPolicy(trust_forwarding_headers=True, trusted_proxy_ips=("10.0.0.1",))
        headers = {
            "host": "example.com",
            "x-forwarded-proto": "http",
            "x-plivo-signature-v2": signature,
            "x-plivo-signature-v2-nonce": nonce,
        }
        url = policy.reconstruct_url("/plivo/voice?flow=answer&callId=abc", headers, "10.0.0.1")
        result = verify_plivo(
            method="POST",
            url=url,
            params=[("CallUUID", "u-1")],
            headers=headers,
            auth_token=PLIVO_TOKEN,
            allow_v2=True,
        )
        self.assertTrue(result.ok, result.reason)

    def test_plivo_v3_multi_signature(self):
        """Plivo V3 accepts a header listing a bad signature and then the good one."""
        params = {"CallUUID": "u-1", "CallStatus": "in-progress"}
        good = plivo_v3_sdk_signature(
            "POST", "https://example.com/plivo/voice?flow=answer", params, "n-1"
        )
        headers = {
            "host": "example.com",
            "x-plivo-signature-v3": "bad, " + good,
            "x-plivo-signature-v3-nonce": "n-1",
        }
        url = ForwardingPolicy().reconstruct_url(
            "/plivo/voice?flow=answer", headers, "198.51.100.1"
        )
        result = verify_plivo(
            method="POST",
            url=url,
            params=list(params.items()),
            headers=headers,
            auth_token=PLIVO_TOKEN,
        )
        self.assertTrue(result.ok, result.reason)

    def test_plivo_missing_headers(self):
        """Plivo without V3 or V2 headers fails with the missing-headers reason."""
        url = ForwardingPolicy().reconstruct_url("/plivo/voice", {"host": "example.com"}, None)
        result = verify_plivo(
            method="POST",
            url=url,
            params=[],
            headers={"host": "example.com"},
            auth_token=PLIVO_TOKEN,
        )
        self.assertFalse(result.ok)
        self.assertIn("Missing Plivo signature headers", result.reason)

    def test_twilio_public_url_gets_request_query(self):
        """With a publicUrl lacking the query, the request's query is appended before verifying."""
        signature = twilio_sdk_signature(
            "https://voice.example.com/voice/webhook?callId=abc&flow=answer"
        )
        result = self.twilio(
            ForwardingPolicy(),
            "/voice/webhook?callId=abc&flow=answer",
            {"host": "localhost:3334"},
            "198.51.100.1",
            signature,
            public_url="https://voice.example.com/voice/webhook",
        )
        self.assertTrue(result.ok, result.reason)
        self.assertEqual(
            result.verification_url,
            "https://voice.example.com/voice/webhook?callId=abc&flow=answer",
        )

    def test_twilio_attacker_forwarded_host_ignored(self):
        """A signature made for an attacker's X-Forwarded-Host is rejected by default."""
        signature = twilio_sdk_signature("https://evil.example/voice/webhook")
        headers = {"host": "localhost:3334", "x-forwarded-host": "evil.example"}
        result = self.twilio(
            ForwardingPolicy(), "/voice/webhook", headers, "198.51.100.1", signature
        )
        self.assertFalse(result.ok)
        self.assertFalse(result.is_ngrok_free_tier)
        self.assertEqual(
            result.reason, "Invalid signature for URL: https://localhost/voice/webhook"
        )

    def test_twilio_ngrok_loopback_accepts_valid(self):
        """The ngrok loopback mode accepts a valid signature for the forwarded ngrok URL."""
        signature = twilio_sdk_signature("https://abc.ngrok-free.app/voice/webhook")
        headers = {
            "host": "localhost:3334",
            "x-forwarded-host": "abc.ngrok-free.app",
            "x-forwarded-proto": "https",
        }
        result = self.twilio(
            ForwardingPolicy(ngrok_loopback_bypass=True),
            "/voice/webhook",
            headers,
            "127.0.0.1",
            signature,
        )
        self.assertTrue(result.ok, result.reason)
        self.assertTrue(result.is_ngrok_free_tier)

    def test_twilio_ngrok_loopback_rejects_invalid(self):
        """The ngrok loopback mode still rejects an invalid signature."""
        headers = {"host": "localhost:3334", "x-forwarded-host": "abc.ngrok-free.app"}
        result = self.twilio(
            ForwardingPolicy(ngrok_loopback_bypass=True),
            "/voice/webhook",
            headers,
            "127.0.0.1",
            "invalid",
        )
        self.assertFalse(result.ok)
        self.assertTrue(result.is_ngrok_free_tier)
        self.assertEqual(
            result.reason, "Invalid signature for URL: https://abc.ngrok-free.app/voice/webhook"
        )

    def test_twilio_ngrok_not_trusted_for_remote_peer(self):
        """The ngrok loopback mode does not trust forwarded headers from a non-loopback peer."""
        signature = twilio_sdk_signature("https://abc.ngrok-free.app/voice/webhook")
        headers = {"host": "localhost:3334", "x-forwarded-host": "abc.ngrok-free.app"}
        result = self.twilio(
            ForwardingPolicy(ngrok_loopback_bypass=True),
            "/voice/webhook",
            headers,
            "203.0.113.9",
            signature,
        )
        self.assertFalse(result.ok)
        self.assertEqual(result.verification_url, "https://localhost/voice/webhook")

    @settings(max_examples=200, deadline=None, database=None)
    @given(
        forwarded=st.text(max_size=40),
        peer=st.sampled_from(["127.0.0.1", "::1", "::ffff:127.0.0.1", "10.0.0.1", None]),
        signature=st.text(max_size=40),
        target=st.text(max_size=40),
    )
    def test_ngrok_loopback_never_accepts_invalid_signature(
        self, forwarded, peer, signature, target
    ):
        """Whatever the forwarded headers and peer, a signature not made with the token fails."""
        headers = {
            "host": "localhost:3334",
            "x-forwarded-host": forwarded,
            "ngrok-forwarded-host": forwarded,
        }
        policy = ForwardingPolicy(ngrok_loopback_bypass=True)
        url = policy.reconstruct_url("/" + target, headers, peer, for_twilio=True)
        result = verify_twilio(
            url=url,
            params=PARAMS,
            signature=signature,
            auth_token=TWILIO_TOKEN,
        )
        self.assertFalse(result.ok)
