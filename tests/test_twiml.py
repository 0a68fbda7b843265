"""
Tests for voicecall.providers.twiml: exact TwiML bodies (SPEC §7.1.3), escaping of every
interpolated value, the Polly voice mapping (SPEC §12.5), stream URLs and query building.
"""
import xml.etree.ElementTree as ET

from twisted.trial.unittest import SynchronousTestCase

from voicecall.providers import twiml

DECL = '<?xml version="1.0" encoding="UTF-8"?>'
NASTY = "a&b<c>d\"e'f"
NASTY_ESCAPED = "a&amp;b&lt;c&gt;d&quot;e&apos;f"


class TwimlBodyTests(SynchronousTestCase):
    """The documents are byte-for-byte the ones SPEC §7.1.3 lists."""

    def test_empty(self):
        """The empty document is the declaration then an empty Response."""
        self.assertEqual(twiml.empty(), DECL + "<Response></Response>")

    def test_pause_default(self):
        """The pause document pauses 30 seconds by default."""
        self.assertEqual(twiml.pause(), DECL + '<Response><Pause length="30"/></Response>')

    def test_pause_length(self):
        """The pause length can be chosen."""
        self.assertEqual(twiml.pause(5), DECL + '<Response><Pause length="5"/></Response>')

    def test_notify(self):
        """Notify says the message with the mapped Polly voice, then hangs up."""
        self.assertEqual(
            twiml.notify("Your table is ready.", "onyx"),
            DECL + '<Response><Say voice="Polly.Brian">Your table is ready.</Say>'
            "<Hangup/></Response>",
        )

    def test_notify_default_voice(self):
        """Notify without a voice uses Polly.Joanna."""
        self.assertEqual(
            twiml.notify("Hi", None),
            DECL + '<Response><Say voice="Polly.Joanna">Hi</Say><Hangup/></Response>',
        )

    def test_hold_queue(self):
        """The hold-queue document says the hold message and enqueues with the hold music URL."""
        self.assertEqual(
            twiml.hold_queue(),
            DECL + '<Response><Say voice="alice">Please hold while we connect you.</Say>'
            '<Enqueue waitUrl="/voice/hold-music">hold-queue</Enqueue></Response>',
        )

    def test_hold_music(self):
        """The hold-music document says the busy message and loops the classical track."""
        self.assertEqual(
            twiml.hold_music(),
            DECL + '<Response><Say voice="alice">All agents are currently busy. Please hold.'
            '</Say><Play loop="0">https://s3.amazonaws.com/com.twilio.music.classical/'
            "BusyStrings.mp3</Play></Response>",
        )

    def test_stream(self):
        """The stream document connects a Stream carrying the token as a Parameter."""
        self.assertEqual(
            twiml.stream("wss://example.com/voice/stream", "tok-123_x"),
            DECL + '<Response><Connect><Stream url="wss://example.com/voice/stream">'
            '<Parameter name="token" value="tok-123_x" /></Stream></Connect></Response>',
        )

    def test_say_and_gather(self):
        """A turn is Say, then a speech Gather posting to the action, then a Redirect."""
        self.assertEqual(
            twiml.say_and_gather(
                "How can I help?",
                "nova",
                "en-GB",
                "https://h.example/voice/webhook?callId=c1&turnToken=t1",
                "https://h.example/voice/webhook?callId=c1",
            ),
            DECL + '<Response><Say voice="Polly.Salli" language="en-GB">How can I help?</Say>'
            '<Gather input="speech" speechTimeout="auto" timeout="120" language="en-GB" '
            'action="https://h.example/voice/webhook?callId=c1&amp;turnToken=t1" '
            'method="POST"></Gather>'
            '<Redirect method="POST">https://h.example/voice/webhook?callId=c1</Redirect>'
            "</Response>",
        )

    def test_say_and_gather_without_text_or_redirect(self):
        """Without text the Say is left out; without a redirect URL there is no Redirect."""
        self.assertEqual(
            twiml.say_and_gather(None, None, None, "https://h/a", None),
            DECL + '<Response><Gather input="speech" speechTimeout="auto" timeout="120" '
            'language="en-US" action="https://h/a" method="POST"></Gather></Response>',
        )

    def test_say(self):
        """A plain Say carries the mapped voice and the default language."""
        self.assertEqual(
            twiml.say("Hello", "shimmer", None),
            DECL + '<Response><Say voice="Polly.Kimberly" language="en-US">Hello</Say>'
            "</Response>",
        )

    def test_say_with_redirect(self):
        """A Say can be followed by a Redirect so the call does not end after it."""
        self.assertEqual(
            twiml.say("Hello", None, "de-DE", redirect_url="https://h/next"),
            DECL + '<Response><Say voice="Polly.Joanna" language="de-DE">Hello</Say>'
            '<Redirect method="POST">https://h/next</Redirect></Response>',
        )


class EscapeTests(SynchronousTestCase):
    """Every interpolated value is XML-escaped."""

    def test_escape_all_five(self):
        """escape() replaces & < > " ' with their entities."""
        self.assertEqual(twiml.escape(NASTY), NASTY_ESCAPED)

    def test_escape_ampersand_first(self):
        """An existing entity is escaped again rather than passed through."""
        self.assertEqual(twiml.escape("&amp;"), "&amp;amp;")

    def assertRoundTrips(self, document, values):
        """The document is well-formed and every raw value appears only escaped."""
        ET.fromstring(document.encode("utf-8"))
        body = document[len(DECL):]
        for value in values:
            self.assertNotIn(value, body)
        self.assertIn(NASTY_ESCAPED, body)

    def test_notify_escapes_message_and_voice(self):
        """Notify escapes the message and a passed-through voice name."""
        doc = twiml.notify(NASTY, "Polly." + NASTY)
        self.assertRoundTrips(doc, [NASTY])
        self.assertIn(f'voice="Polly.{NASTY_ESCAPED}"', doc)

    def test_stream_escapes_url_and_token(self):
        """The stream document escapes the URL and the token."""
        doc = twiml.stream("wss://h/s?" + NASTY, NASTY)
        self.assertRoundTrips(doc, [NASTY])
        root = ET.fromstring(doc.encode("utf-8"))
        stream = root.find("Connect/Stream")
        self.assertEqual(stream.get("url"), "wss://h/s?" + NASTY)
        self.assertEqual(stream.find("Parameter").get("value"), NASTY)

    def test_say_and_gather_escapes_everything(self):
        """Text, voice, language, action URL and redirect URL are all escaped."""
        doc = twiml.say_and_gather(NASTY, "Google." + NASTY, NASTY, "https://h/?" + NASTY,
                                   "https://h/r?" + NASTY)
        self.assertRoundTrips(doc, [NASTY])
        root = ET.fromstring(doc.encode("utf-8"))
        self.assertEqual(root.find("Say").text, NASTY)
        self.assertEqual(root.find("Say").get("voice"), "Google." + NASTY)
        self.assertEqual(root.find("Say").get("language"), NASTY)
        self.assertEqual(root.find("Gather").get("language"), NASTY)
        self.assertEqual(root.find("Gather").get("action"), "https://h/?" + NASTY)
        self.assertEqual(root.find("Redirect").text, "https://h/r?" + NASTY)

    def test_say_escapes_text_language_and_redirect(self):
        """The plain Say escapes its text, language and redirect URL."""
        doc = twiml.say(NASTY, None, NASTY, redirect_url="https://h/?" + NASTY)
        self.assertRoundTrips(doc, [NASTY])
        root = ET.fromstring(doc.encode("utf-8"))
        self.assertEqual(root.find("Say").text, NASTY)
        self.assertEqual(root.find("Redirect").text, "https://h/?" + NASTY)


class PollyVoiceTests(SynchronousTestCase):
    """The OpenAI-to-Polly mapping of SPEC §12.5."""

    def test_mapping_table(self):
        """Each OpenAI voice maps to its Polly voice."""
        table = {
            "alloy": "Polly.Joanna",
            "echo": "Polly.Matthew",
            "fable": "Polly.Amy",
            "onyx": "Polly.Brian",
            "nova": "Polly.Salli",
            "shimmer": "Polly.Kimberly",
        }
        self.assertEqual({k: twiml.polly_voice(k) for k in table}, table)

    def test_case_insensitive(self):
        """OpenAI voice names match regardless of case."""
        self.assertEqual(twiml.polly_voice("ECHO"), "Polly.Matthew")
        self.assertEqual(twiml.polly_voice("Fable"), "Polly.Amy")

    def test_passthrough(self):
        """Polly.* and Google.* voices pass through unchanged."""
        self.assertEqual(twiml.polly_voice("Polly.Hans"), "Polly.Hans")
        self.assertEqual(twiml.polly_voice("Google.en-US-Neural2-F"), "Google.en-US-Neural2-F")

    def test_default(self):
        """Unset, empty or unknown voices become Polly.Joanna."""
        for voice in (None, "", "marin", "alice", "polly"):
            self.assertEqual(twiml.polly_voice(voice), "Polly.Joanna")


class StreamUrlTests(SynchronousTestCase):
    """The media-stream URL is the public origin with a WebSocket scheme plus the path."""

    def test_https_becomes_wss(self):
        """An https public URL gives wss, dropping its path and query."""
        self.assertEqual(
            twiml.stream_url("https://voice.example.com/voice/webhook?x=1", "/voice/stream"),
            "wss://voice.example.com/voice/stream",
        )

    def test_http_becomes_ws_and_keeps_port(self):
        """An http public URL gives ws and keeps a non-default port."""
        self.assertEqual(
            twiml.stream_url("http://127.0.0.1:3334/voice/webhook", "/voice/stream"),
            "ws://127.0.0.1:3334/voice/stream",
        )

    def test_default_port_dropped_and_slash_added(self):
        """A default port is left out, as in an origin, and a leading slash is added."""
        self.assertEqual(
            twiml.stream_url("https://Voice.Example.com:443", "media"),
            "wss://voice.example.com/media",
        )

    def test_not_http(self):
        """A public URL that is not http(s) is refused."""
        self.assertRaises(ValueError, twiml.stream_url, "ftp://x/", "/s")
        self.assertRaises(ValueError, twiml.stream_url, "not a url", "/s")


class WithQueryTests(SynchronousTestCase):
    """with_query appends URL-encoded parameters to a URL."""

    def test_no_query_yet(self):
        """A URL without a query gets a question mark."""
        self.assertEqual(
            twiml.with_query("https://h/voice", callId="c1"), "https://h/voice?callId=c1"
        )

    def test_existing_query(self):
        """A URL with a query gets an ampersand, parameters in the order given."""
        self.assertEqual(
            twiml.with_query("https://h/voice?callId=c1", type="status", turnToken="t"),
            "https://h/voice?callId=c1&type=status&turnToken=t",
        )

    def test_encoding(self):
        """Values are percent-encoded, including spaces, plus, slash, ampersand and equals."""
        self.assertEqual(
            twiml.with_query("https://h/v", t="a b+c/d&e=f"),
            "https://h/v?t=a%20b%2Bc%2Fd%26e%3Df",
        )

    def test_trailing_question_mark_and_fragment(self):
        """A trailing ? is reused and a fragment stays at the end."""
        self.assertEqual(twiml.with_query("https://h/v?", a="1"), "https://h/v?a=1")
        self.assertEqual(twiml.with_query("https://h/v#frag", a="1"), "https://h/v?a=1#frag")

    def test_none_skipped(self):
        """None values are left out, and no parameters leave the URL unchanged."""
        self.assertEqual(twiml.with_query("https://h/v", a=None, b="2"), "https://h/v?b=2")
        self.assertEqual(twiml.with_query("https://h/v", a=None), "https://h/v")
