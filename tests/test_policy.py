"""
Tests for voicecall.domain.policy (inbound caller-ID screening, SPEC §6.1 and the §19 allowlist bullets)
and voicecall.infra.bounded (the FIFO-capped set of SPEC §20 item 15).
"""
from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from voicecall.infra.bounded import BoundedSet
from voicecall.domain.policy import digits_only, inbound_decision


class DigitsOnlyTests(SynchronousTestCase):
    """digits_only normalises a phone number by deleting every non-digit."""

    def test_formatted_number(self):
        """`+1 (415) 555-0123` normalises to `14155550123`."""
        self.assertEqual(digits_only("+1 (415) 555-0123"), "14155550123")

    def test_empty_and_none(self):
        """An empty string and None both normalise to the empty string."""
        self.assertEqual((digits_only(""), digits_only(None)), ("", ""))

    def test_no_digits(self):
        """A value without digits (`anonymous`) normalises to the empty string."""
        self.assertEqual(digits_only("anonymous"), "")


class InboundDecisionTests(SynchronousTestCase):
    """inbound_decision accepts (None) or rejects (a reason) an inbound caller."""

    def test_exact_match_after_normalisation(self):
        """A caller whose digits equal a listed number's digits is accepted, formatting aside."""
        self.assertIsNone(inbound_decision("allowlist", ["+1 (415) 555-0123"], "+14155550123"))
        self.assertIsNone(inbound_decision("allowlist", ["+14155550123"], "1-415-555-0123"))

    def test_any_listed_number_matches(self):
        """The caller is accepted when any entry of the list matches, not only the first."""
        self.assertIsNone(inbound_decision("allowlist", ["+15550000001", "+15550001234"], "+15550001234"))

    def test_unlisted_caller_rejected(self):
        """A caller whose number is not listed is rejected."""
        self.assertEqual(
            inbound_decision("allowlist", ["+15550001234"], "+15550009999"), "caller not in allowFrom"
        )

    def test_blank_caller_rejected(self):
        """A missing, blank or anonymous caller ID is rejected as missing."""
        for caller in (None, "", "   ", "anonymous"):
            self.assertEqual(
                inbound_decision("allowlist", ["+15550001234"], caller), "missing caller ID", caller
            )

    def test_blank_and_non_numeric_entries_never_match(self):
        """Blank or non-numeric allowFrom entries match no caller, not even one without digits."""
        entries = ["", "   ", "anonymous", "+"]
        self.assertEqual(inbound_decision("allowlist", entries, "+15550001234"), "caller not in allowFrom")
        self.assertEqual(inbound_decision("allowlist", entries, "anonymous"), "missing caller ID")

    def test_suffix_match_rejected(self):
        """A caller whose digits merely end (or start) with a listed number's digits is rejected."""
        self.assertIsNotNone(inbound_decision("allowlist", ["+15550001234"], "+99915550001234"))
        self.assertIsNotNone(inbound_decision("allowlist", ["+99915550001234"], "+15550001234"))
        self.assertIsNotNone(inbound_decision("allowlist", ["+15550001234"], "+1555000123"))

    def test_pairing_screens_like_allowlist(self):
        """The `pairing` policy screens callers exactly like `allowlist`."""
        self.assertIsNone(inbound_decision("pairing", ["+15550001234"], "+15550001234"))
        self.assertEqual(inbound_decision("pairing", ["+15550001234"], "+15550009999"), "caller not in allowFrom")
        self.assertEqual(inbound_decision("pairing", ["+15550001234"], None), "missing caller ID")

    def test_open_accepts_everyone(self):
        """The `open` policy accepts any caller, even one without caller ID."""
        self.assertIsNone(inbound_decision("open", [], "+15550009999"))
        self.assertIsNone(inbound_decision("open", [], None))

    def test_disabled_rejects_everyone(self):
        """The `disabled` policy rejects even a listed caller."""
        self.assertEqual(inbound_decision("disabled", ["+15550001234"], "+15550001234"), "policy is disabled")


class BoundedSetTests(SynchronousTestCase):
    """BoundedSet keeps at most `limit` members and forgets the oldest inserted first."""

    def test_evicts_oldest_first(self):
        """Adding past the cap evicts the oldest inserted member, one at a time."""
        s = BoundedSet(3)
        for member in "abcd":
            s.add(member)
        self.assertEqual((list(s), len(s)), (["b", "c", "d"], 3))
        s.add("e")
        self.assertEqual(list(s), ["c", "d", "e"])
        self.assertNotIn("a", s)
        self.assertNotIn("b", s)

    def test_re_adding_does_not_refresh(self):
        """Re-adding an existing member keeps its position, so it is still evicted first."""
        s = BoundedSet(3)
        for member in "abc":
            s.add(member)
        s.add("a")
        self.assertEqual(len(s), 3)
        s.add("d")
        self.assertEqual(list(s), ["b", "c", "d"])

    def test_duplicates_do_not_grow(self):
        """Adding the same member many times stores it once."""
        s = BoundedSet(5)
        for _ in range(10):
            s.add("x")
        self.assertEqual(list(s), ["x"])

    def test_discard(self):
        """A discarded member is gone, frees its slot, and discarding a stranger is harmless."""
        s = BoundedSet(2, ["a", "b"])
        s.discard("a")
        s.discard("zzz")
        s.add("c")
        self.assertEqual(list(s), ["b", "c"])

    def test_initial_members_respect_the_cap(self):
        """Members given to the constructor are added in order under the same cap."""
        self.assertEqual(list(BoundedSet(2, ["a", "b", "c", "a"])), ["c", "a"])

    def test_limit_must_be_positive(self):
        """A cap below one is refused."""
        self.assertRaises(ValueError, BoundedSet, 0)
