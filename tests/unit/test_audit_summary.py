"""broker.audit.summary and broker.audit.outcome: pure, the clock passed in."""

from __future__ import annotations

import base64
import hashlib

import pytest

from broker.audit.outcome import Outcome, response_digest
from broker.audit.summary import OTHER_NETWORK, UNKNOWN_NETWORK, NoiseSummary, client_network


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("203.0.113.77", "203.0.113.0/24"),
        ("::ffff:203.0.113.77", "203.0.113.0/24"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1::/48"),
        ("fe80::1%eth0", "fe80::/48"),
        (None, UNKNOWN_NETWORK),
        ("", UNKNOWN_NETWORK),
        ("not-an-ip", UNKNOWN_NETWORK),
    ],
    ids=["ipv4-/24", "ipv4-mapped", "ipv6-/48", "ipv6-scoped", "none", "empty", "unix-socket"],
)
def test_client_network(address: str | None, network: str) -> None:
    assert client_network(address) == network


def test_one_record_per_reason_and_network_per_window() -> None:
    summary = NoiseSummary(window=10)
    for i in range(1000):
        summary.add("svid_missing", "198.51.100.0/24", 100 + i / 1000)
    summary.add("http_body_framing", "198.51.100.0/24", 101)
    summary.add("svid_missing", "192.0.2.0/24", 105)
    assert summary.next_due() == 110
    assert summary.due(109.999) == []
    [first] = summary.due(110)
    assert (first.reason, first.client_network, first.count) == ("svid_missing", "198.51.100.0/24", 1000)
    fields = first.fields()
    assert fields["event"] == "summary" and fields["decision"] == "deny" and fields["count"] == 1000
    assert (fields["window_start"], fields["window_end"]) == (
        "1970-01-01T00:01:40.000Z",
        "1970-01-01T00:01:50.000Z",
    )
    # a refusal after the window closed opens a new one: never two records of a key within one window
    summary.add("svid_missing", "198.51.100.0/24", 112)
    assert [s.count for s in summary.due(111)] == [1]  # http_body_framing, opened at 101
    assert summary.due(114.9) == []
    drained = summary.drain(116)
    assert sorted((s.reason, s.client_network, s.count) for s in drained) == [
        ("svid_missing", "192.0.2.0/24", 1),
        ("svid_missing", "198.51.100.0/24", 1),
    ]
    assert len(summary) == 0 and summary.pending == 0 and summary.next_due() is None


def test_keys_are_bounded_and_restore_keeps_counts() -> None:
    summary = NoiseSummary(window=10, max_keys=2)
    for n in range(5):
        summary.add("svid_missing", f"10.0.{n}.0/24", 1)
    assert len(summary) == 3  # two networks and "other"
    [other] = [s for s in summary.drain(2) if s.client_network == OTHER_NETWORK]
    assert other.count == 3
    summary.add("r", "n", 5)
    [closed] = summary.due(15)
    summary.add("r", "n", 16)
    summary.restore(closed)  # its write failed: counted again, with the key's next window
    [again] = summary.due(15.5)
    assert (again.count, again.start) == (2, 5)


def test_outcome_fields() -> None:
    outcome = Outcome(started=1.0)
    outcome.answered(200)
    outcome.finished(1.01234)
    outcome.finished(9.0)  # the first end counts
    fields = outcome.fields(5.0, b'{"ok":true}')
    expected = base64.urlsafe_b64encode(hashlib.sha256(b'{"ok":true}').digest()).rstrip(b"=").decode()
    assert fields == {
        "event": "outcome",
        "decision": "allow",
        "reason": "",
        "status": 200,
        "duration_ms": 12.3,
        "response_digest": expected,
    }
    assert response_digest(b'{"ok":true}') == expected and "=" not in expected


def test_streamed_outcome_digests_the_bytes_relayed_and_keeps_the_first_failure() -> None:
    outcome = Outcome(started=0.0)
    for chunk in (b"data: 1\n\n", b"data: 2\n\n"):
        outcome.sent(chunk)
    outcome.fail("upstream_stream_broken")
    outcome.fail("agent_disconnected")
    fields = outcome.fields(0.5)
    assert fields["response_digest"] == response_digest(b"data: 1\n\ndata: 2\n\n")
    assert (fields["decision"], fields["reason"], fields["status"], fields["duration_ms"]) == (
        "error",
        "upstream_stream_broken",
        None,
        500.0,
    )
