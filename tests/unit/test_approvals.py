"""Approvals (CONTRACT §6): the pure rules, the approver rules (CEL) and the records in a MemoryStore.

Time is explicit: every call takes ``now`` (``T0`` plus an offset), so expiry is tested without a clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from broker.canonical import args_digest
from broker.config.models import Approvals, Approver, Webhook
from broker.errors import AccessDenied, NotFound, PayloadTooLarge, RateLimited, StateUnavailable
from broker.gateway.approvals import ApprovalService
from broker.jose import Signer, generate_ec_jwk
from broker.observability import Metrics
from broker.policy.approvers import Eligibility, EligibilityCompileError
from broker.state.base import MAX_RECORD_BYTES, json_dumps
from broker.state.memory import MemoryStore
from broker.txn.approval_rules import Approval, Vote, apply_decision, approval_requirements, covers, rfc3339
from broker.txn.approvals import MAX_PENDING_LISTED, ApprovalBook
from broker.txn.webhooks import MAX_BACKOFF_SECONDS, WebhookNotifier, announcement_claims

T0 = 1_750_000_000.0
TTL = 3600
AGENT = "spiffe://example.org/agents/expense-assistant"
ARGS = {"invoice_id": "INV-8831", "amount": 6000, "department": "42"}
DIGEST = args_digest(ARGS)

CAROL = {"groups": ["managers"], "acr": "mfa"}
DAVE = {"groups": ["managers"], "acr": "mfa"}
SAM = {"groups": ["security"], "acr": "mfa"}
ERIN = {"groups": ["engineers"], "acr": "mfa"}
ELIGIBILITY = Eligibility.compile(Approvals())


def make_book(store: MemoryStore | None = None) -> ApprovalBook:
    return ApprovalBook(store if store is not None else MemoryStore(), ttl_seconds=TTL)


async def request(
    book: ApprovalBook, *, required: tuple[str, ...] = ("manager_approval",), now: float = T0, **binding: Any
) -> tuple[Approval, bool]:
    arguments = binding.pop("arguments", ARGS)
    fields: dict[str, Any] = {
        "subject": "alice",
        "actor": AGENT,
        "tool": "approveExpense",
        "arguments": arguments,
        "args_digest": args_digest(arguments),
        **binding,
    }
    return await book.request(
        **fields, required=required, reason="amount above 5000", policy_version="pv1", now=now
    )


async def vote(
    book: ApprovalBook,
    approval: Approval,
    sub: str,
    claims: Mapping[str, Any],
    decision: str = "approve",
    *,
    now: float = T0 + 10,
) -> Approval:
    return await book.decide(
        approval.id,
        approver_sub=sub,
        approver_claims=claims,
        decision=decision,  # type: ignore[arg-type]
        eligible=ELIGIBILITY.for_approval(approval),
        now=now,
    )


# --- requests ---------------------------------------------------------------------------------------------


async def test_request_creates_a_pending_approval_readable_by_id() -> None:
    book = make_book()
    approval, created = await request(book)
    assert created and approval.state == "pending" and len(approval.id) == 22
    assert await book.get(approval.id, T0 + 1) == approval
    assert approval.to_api(now=T0 + 1) == {
        "id": approval.id,
        "state": "pending",
        "required": ["manager_approval"],
        "approvals": [],
        "tool": "approveExpense",
        "arguments": ARGS,
        "subject": "alice",
        "actor": AGENT,
        "expires_at": rfc3339(T0 + TTL),
        "used_at": None,  # extension: when the one call it approves was executed
    }
    assert rfc3339(T0) == "2025-06-15T15:06:40Z"


async def test_the_same_binding_returns_the_live_approval() -> None:
    book = make_book()
    first, _ = await request(book)
    again, created = await request(book, now=T0 + 60)
    assert (again.id, created) == (first.id, False)


@pytest.mark.parametrize(
    "change",
    [
        {"subject": "bob"},
        {"actor": "spiffe://example.org/agents/travel-bot"},
        {"tool": "listInvoices"},
        {"arguments": {**ARGS, "amount": 6001}},
        {"required": ("dual_approval",)},
    ],
    ids=["subject", "actor", "tool", "arguments", "required"],
)
async def test_another_binding_gets_another_approval(change: dict[str, Any]) -> None:
    book = make_book()
    first, _ = await request(book)
    other, created = await request(book, **change)
    assert created and other.id != first.id


async def test_concurrent_identical_requests_share_one_approval() -> None:
    store = YieldingStore()
    book = make_book(store)
    results = await asyncio.gather(*(request(book) for _ in range(8)))
    assert store.conflicts > 0  # the race did happen
    assert len({a.id for a, _ in results}) == 1
    assert sum(created for _, created in results) == 1


async def test_an_expired_approval_is_replaced_and_reads_as_expired() -> None:
    book = make_book()
    old, _ = await request(book)
    assert (await book.get(old.id, T0 + TTL)).state_at(T0 + TTL) == "expired"  # type: ignore[union-attr]
    assert old.to_api(now=T0 + TTL)["state"] == "expired"
    new, created = await request(book, now=T0 + TTL)
    assert created and new.id != old.id


async def test_a_denied_approval_is_replaced_by_a_new_request() -> None:
    book = make_book()
    old, _ = await request(book)
    await vote(book, old, "carol", CAROL, "deny")
    new, created = await request(book, now=T0 + 20)
    assert created and new.id != old.id


@pytest.mark.parametrize(
    "approval_id",
    ["", "short", "A" * 23, "../../approval:xxxxxxxxxx", "AAAAAAAAAAAAAAAAAAAAA*", "AAAAAAAAAAAAAAAAAAAAAA"],
    ids=["empty", "short", "long", "path", "glob", "unknown"],
)
async def test_get_answers_none_for_unknown_or_malformed_ids(approval_id: str) -> None:
    book = make_book()
    await request(book)
    assert await book.get(approval_id, T0) is None


@pytest.mark.parametrize(
    "required", [("mfa",), ("manager_approval", "root")], ids=["mfa-only", "unknown-obligation"]
)
async def test_request_refuses_requirements_that_are_not_approvals(required: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        await request(make_book(), required=required)


async def test_request_refuses_a_digest_of_other_arguments() -> None:
    with pytest.raises(ValueError):
        await request(make_book(), args_digest=args_digest({"other": 1}))


async def test_request_refuses_arguments_too_large_to_store() -> None:
    with pytest.raises(PayloadTooLarge):
        await request(make_book(), arguments={"blob": "x" * 40_000})


def test_requirements_drop_mfa_and_keep_a_stable_order() -> None:
    assert approval_requirements(["security_review", "mfa", "manager_approval"]) == (
        "manager_approval",
        "security_review",
    )


# --- decisions --------------------------------------------------------------------------------------------


async def test_one_manager_approves_manager_approval() -> None:
    book = make_book()
    approval, _ = await request(book)
    updated = await vote(book, approval, "carol", CAROL)
    assert updated.state == "approved"
    assert updated.to_api(now=T0 + 10)["approvals"] == [
        {"sub": "carol", "decision": "approve", "at": rfc3339(T0 + 10)}
    ]
    assert await book.get(approval.id, T0 + 11) == updated


async def test_dual_approval_needs_two_distinct_approvers() -> None:
    book = make_book()
    approval, _ = await request(book, required=("dual_approval",))
    one = await vote(book, approval, "carol", CAROL)
    assert one.state == "pending" and one.unsatisfied() == ("dual_approval",)
    two = await vote(book, approval, "dave", DAVE, now=T0 + 20)
    assert two.state == "approved" and [v.sub for v in two.approvals] == ["carol", "dave"]


async def test_manager_and_dual_together_count_each_vote_toward_both() -> None:
    book = make_book()
    approval, _ = await request(book, required=("manager_approval", "dual_approval"))
    one = await vote(book, approval, "carol", CAROL)
    assert one.state == "pending" and one.approvals[0].satisfies == ("manager_approval", "dual_approval")
    assert (await vote(book, approval, "dave", DAVE)).state == "approved"


async def test_security_review_needs_the_security_group() -> None:
    book = make_book()
    approval, _ = await request(book, required=("security_review",))
    with pytest.raises(AccessDenied) as refused:
        await vote(book, approval, "carol", CAROL)
    assert refused.value.reason == "approval_not_eligible"
    assert (await vote(book, approval, "sam", SAM)).state == "approved"


async def test_an_eligible_deny_ends_the_approval() -> None:
    book = make_book()
    approval, _ = await request(book, required=("dual_approval",))
    await vote(book, approval, "carol", CAROL)
    denied = await vote(book, approval, "dave", DAVE, "deny")
    assert denied.state == "denied"
    with pytest.raises(AccessDenied) as refused:
        await vote(book, approval, "frank", DAVE)
    assert refused.value.reason == "approval_not_pending"


async def _approved(book: ApprovalBook) -> Approval:
    approval, _ = await request(book)
    await vote(book, approval, "carol", CAROL)
    return approval


async def _dual_with_carol(book: ApprovalBook) -> Approval:
    approval, _ = await request(book, required=("dual_approval",))
    await vote(book, approval, "carol", CAROL)
    return approval


async def _pending(book: ApprovalBook) -> Approval:
    return (await request(book))[0]


@pytest.mark.parametrize(
    ("setup", "sub", "claims", "now", "reason"),
    [
        (_pending, "alice", CAROL, T0 + 10, "approval_self"),
        (_pending, "erin", ERIN, T0 + 10, "approval_not_eligible"),
        (_pending, "erin", {"acr": "mfa"}, T0 + 10, "approval_not_eligible"),
        (_pending, "erin", {"groups": "managers"}, T0 + 10, "approval_not_eligible"),
        (_dual_with_carol, "carol", CAROL, T0 + 20, "approval_already_decided"),
        (_approved, "dave", DAVE, T0 + 20, "approval_not_pending"),
        (_pending, "carol", CAROL, T0 + TTL, "approval_expired"),
    ],
    ids=["requester", "other-group", "no-groups", "groups-not-a-list", "twice", "decided", "expired"],
)
async def test_decisions_that_are_refused(
    setup: Any, sub: str, claims: Mapping[str, Any], now: float, reason: str
) -> None:
    book = make_book()
    approval = await setup(book)
    before = await book.get(approval.id, now)
    with pytest.raises(AccessDenied) as refused:
        await vote(book, approval, sub, claims, now=now)
    assert refused.value.reason == reason
    assert await book.get(approval.id, now) == before  # nothing recorded


async def test_deciding_an_unknown_approval_is_not_found() -> None:
    book = make_book()
    approval, _ = await request(book)
    with pytest.raises(NotFound):
        await vote(book, replace(approval, id="A" * 22), "carol", CAROL)


def test_apply_decision_refuses_anything_but_approve_or_deny() -> None:
    approval = Approval(
        id="A" * 22,
        state="pending",
        required=("manager_approval",),
        tool="t",
        arguments={},
        args_digest=args_digest({}),
        subject="alice",
        actor=AGENT,
        reason="",
        created_at=T0,
        expires_at=T0 + TTL,
        policy_version="pv1",
    )
    with pytest.raises(ValueError):
        apply_decision(
            approval,
            approver_sub="carol",
            approver_claims=CAROL,
            decision="maybe",  # type: ignore[arg-type]
            eligible=ELIGIBILITY.for_approval(approval),
            now=T0,
        )


class YieldingStore(MemoryStore):
    """A MemoryStore that lets the event loop switch tasks before each record operation, as a network store
    does: without it, coroutines on a MemoryStore never interleave and a race cannot happen."""

    async def get_json(self, key: str) -> dict[str, Any] | None:
        await asyncio.sleep(0)
        return await super().get_json(key)

    conflicts = 0

    async def compare_and_set_json(
        self, key: str, expected_version: int, value: Mapping[str, Any], ttl_seconds: float
    ) -> bool:
        await asyncio.sleep(0)
        written = await super().compare_and_set_json(key, expected_version, value, ttl_seconds)
        self.conflicts += not written
        return written


async def test_concurrent_decisions_keep_one_consistent_record() -> None:
    store = YieldingStore()
    book = make_book(store)
    approval, _ = await request(book, required=("dual_approval",))
    approvers = ["carol", "dave", "frank", "grace", "heidi"]
    results = await asyncio.gather(
        *(vote(book, approval, sub, CAROL) for sub in approvers), return_exceptions=True
    )
    granted = [r for r in results if isinstance(r, Approval)]
    refused = [r for r in results if isinstance(r, AccessDenied)]
    assert store.conflicts > 0  # the race did happen
    assert len(granted) == 2 and len(refused) == 3
    assert {r.reason for r in refused} == {"approval_not_pending"}
    final = await book.get(approval.id, T0 + 11)
    assert final is not None and final.state == "approved"
    assert sorted(v.sub for v in final.approvals) == sorted(g.approvals[-1].sub for g in granted)


async def test_pending_lists_only_undecided_unexpired_approvals() -> None:
    book = make_book()
    decided = await _approved(book)
    waiting, _ = await request(book, required=("dual_approval",))
    late, _ = await request(book, subject="bob", now=T0 - TTL + 5)
    assert [a.id for a in await book.pending(T0 + 30)] == [waiting.id]
    assert decided.id != waiting.id != late.id


async def test_a_full_pending_index_refuses_new_approvals_and_records_nothing() -> None:
    """The index is shared by every principal: when it is full a new approval is refused, never hidden."""
    store = MemoryStore()
    book = ApprovalBook(store, ttl_seconds=TTL, max_pending_per_principal=2, max_pending_listed=3)
    first, _ = await request(book, arguments={**ARGS, "invoice_id": "INV-1"})
    await request(book, arguments={**ARGS, "invoice_id": "INV-2"})
    bobs, _ = await request(book, subject="bob")  # one of bob's two slots
    index = await store.get_json("approval_pending")
    entries = len(store)
    # alice holds both of her slots (her own quota refuses first); bob, with one slot free, meets the full index
    for subject in ("alice", "bob"):
        with pytest.raises(RateLimited) as refused:
            await request(book, subject=subject, arguments={**ARGS, "invoice_id": "INV-3"}, now=T0 + 1)
        expected = "approval_quota" if subject == "alice" else "approval_pending_full"
        assert (refused.value.status, refused.value.code, refused.value.reason) == (
            429,
            "rate_limited",
            expected,
        )
    # nothing recorded: no record, no binding, no listing, no quota event
    assert len(store) == entries and await store.get_json("approval_pending") == index
    assert [a.id for a in await book.pending(T0 + 2)][-1] == bobs.id
    again, created = await request(book, subject="bob", now=T0 + 2)  # an existing approval still answers
    assert (again.id, created) == (bobs.id, False)
    await vote(book, first, "carol", CAROL, "deny")  # a decision gives its place back
    retried, created = await request(
        book, subject="bob", arguments={**ARGS, "invoice_id": "INV-3"}, now=T0 + 20
    )
    # created within bob's two slots: the refused request had handed its quota event back
    assert created and retried.id in [a.id for a in await book.pending(T0 + 21)]


def test_the_pending_index_cap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_pending_listed"):
        ApprovalBook(MemoryStore(), ttl_seconds=TTL, max_pending_listed=0)


async def test_a_request_that_loses_the_race_gives_its_index_place_back() -> None:
    store = YieldingStore()
    book = ApprovalBook(store, ttl_seconds=TTL, max_pending_listed=9)
    results = await asyncio.gather(*(request(book) for _ in range(8)))  # each listed itself before the race
    assert store.conflicts > 0 and sum(created for _, created in results) == 1
    index = await store.get_json("approval_pending")
    assert index is not None and [e["id"] for e in index["ids"]] == [results[0][0].id]
    for n in range(8):  # the seven losers' places are free again: eight more fit
        assert (await request(book, subject=f"user{n}"))[1]
    with pytest.raises(RateLimited):
        await request(book, subject="bob")


def test_the_pending_index_cap_is_at_most_what_one_store_record_holds() -> None:
    with pytest.raises(ValueError, match="max_pending_listed"):
        ApprovalBook(MemoryStore(), ttl_seconds=TTL, max_pending_listed=MAX_PENDING_LISTED + 1)
    assert Approvals().max_pending_listed == MAX_PENDING_LISTED
    for cap in (0, MAX_PENDING_LISTED + 1):
        with pytest.raises(ValidationError, match="max_pending_listed"):
            Approvals(max_pending_listed=cap)


async def test_a_full_index_of_the_largest_cap_fits_one_store_record() -> None:
    """MAX_PENDING_LISTED entries with the longest expiry JSON writes (18 characters: 17 significant digits) fit the
    store's 64 KiB record cap: the next request is refused as full, never a store error."""
    now = T0 + 0.1234567
    assert len(json_dumps(now + TTL)) == 18
    book = ApprovalBook(MemoryStore(), ttl_seconds=TTL, max_pending_per_principal=MAX_PENDING_LISTED + 1)
    for n in range(MAX_PENDING_LISTED):
        assert (await request(book, arguments={**ARGS, "invoice_id": f"INV-{n}"}, now=now))[1]
    with pytest.raises(RateLimited, match="waiting") as refused:
        await request(book, arguments={**ARGS, "invoice_id": "INV-X"}, now=now)
    assert refused.value.reason == "approval_pending_full"
    assert len(json_dumps(await book.store.get_json("approval_pending")).encode()) <= MAX_RECORD_BYTES


async def test_the_configured_cap_reaches_the_book() -> None:
    async with aiohttp.ClientSession() as session:
        service = ApprovalService.create(
            Approvals(max_pending_listed=7),
            MemoryStore(),
            Signer.from_jwk(generate_ec_jwk()),
            session,
            Metrics(),
            "https://b",
        )
        assert service.book.max_pending_listed == 7
        await service.close()


# --- lost replies: a write the store carried out whose answer never came back ------------------------------


class LostReplyStore(MemoryStore):
    """A MemoryStore whose compare-and-sets on keys starting with ``prefix`` are carried out and their answer then
    lost, ``times`` times: ``lost()`` is raised instead, as for a Redis timeout after the script ran, or the request
    cancelled in flight because its client went away. With ``then_down`` the write after each lost one fails
    before it runs (the store became unreachable). A double of the store, not of the book."""

    def __init__(
        self, prefix: str, lost: Callable[[], BaseException], *, times: int = 1_000, then_down: bool = False
    ) -> None:
        super().__init__()
        self.prefix, self.lost, self.times, self.then_down = prefix, lost, times, then_down
        self.down = False

    async def compare_and_set_json(
        self, key: str, expected_version: int, value: Mapping[str, Any], ttl_seconds: float
    ) -> bool:
        if self.down and key.startswith(self.prefix):
            self.down = False
            raise StateUnavailable("state store unreachable", reason="state_error")
        if self.times <= 0 or not key.startswith(self.prefix):
            return await super().compare_and_set_json(key, expected_version, value, ttl_seconds)
        await super().compare_and_set_json(key, expected_version, value, ttl_seconds)
        self.times -= 1
        self.down = self.then_down
        raise self.lost()


LOST_REPLIES = pytest.mark.parametrize(
    "lost",
    [lambda: StateUnavailable("state store timed out", reason="state_error"), asyncio.CancelledError],
    ids=["store_timeout", "client_gone"],
)


async def json_keys(store: MemoryStore, *keys: str) -> list[dict[str, Any] | None]:
    return [await store.get_json(key) for key in keys]


@LOST_REPLIES
async def test_a_lost_index_reply_keeps_the_quota_event_of_a_place_it_cannot_give_back(
    lost: Callable[[], BaseException],
) -> None:
    """Review finding: a place listed without an answer, then not given back, was counted nowhere — one principal
    could fill the shared index past its quota. Now its quota event counts until the place surely is free."""
    store = LostReplyStore("approval_pending", lost, times=2, then_down=True)
    book = ApprovalBook(store, ttl_seconds=TTL, max_pending_per_principal=2, max_pending_listed=3)
    for n in range(2):  # each listed itself, got no answer, and could not give its place back
        with pytest.raises(type(lost())):
            await request(book, subject="mallory", arguments={**ARGS, "invoice_id": f"INV-{n}"})
    index = await store.get_json("approval_pending")
    assert index is not None and len(index["ids"]) == 2 and await book.pending(T0 + 1) == []
    with pytest.raises(RateLimited) as refused:  # both events still count: no third place for mallory
        await request(book, subject="mallory", arguments={**ARGS, "invoice_id": "INV-2"})
    assert refused.value.reason == "approval_quota"
    bobs, created = await request(book, subject="bob")  # the place her quota leaves to everyone else
    assert created and [a.id for a in await book.pending(T0 + 1)] == [bobs.id]
    with pytest.raises(RateLimited, match="waiting"):
        await request(book, subject="carol")


@LOST_REPLIES
async def test_a_lost_index_reply_gives_the_place_and_then_the_quota_event_back(
    lost: Callable[[], BaseException],
) -> None:
    store = LostReplyStore("approval_pending", lost, times=1)
    book = ApprovalBook(store, ttl_seconds=TTL, max_pending_per_principal=2, max_pending_listed=3)
    with pytest.raises(type(lost())):
        await request(book)
    assert await store.get_json("approval_pending") == {"ids": [], "version": 2}  # listed, then given back
    for n in range(2):  # both of alice's slots are free: the event was handed back with the place
        assert (await request(book, arguments={**ARGS, "invoice_id": f"INV-{n}"}))[1]


@LOST_REPLIES
async def test_a_lost_binding_reply_keeps_the_approval_listed_and_counted(
    lost: Callable[[], BaseException],
) -> None:
    """Review finding: the binding may have been written when its answer is lost; giving back the place and the
    quota event left a live approval unlisted and uncounted. Now both are kept, and the next identical request
    completes the record from the binding's copy (and announces it: its write created the record)."""
    store = LostReplyStore("approval_binding:", lost, times=2)
    book = ApprovalBook(store, ttl_seconds=TTL, max_pending_per_principal=2)
    invoices = [{**ARGS, "invoice_id": f"INV-{n}"} for n in range(2)]
    for arguments in invoices:
        with pytest.raises(type(lost())):
            await request(book, arguments=arguments)
    listed = (await store.get_json("approval_pending") or {})["ids"]
    assert len(listed) == 2 and await book.pending(T0 + 1) == []  # listed, no record yet: nothing to decide
    with pytest.raises(RateLimited) as refused:
        await request(book, arguments={**ARGS, "invoice_id": "INV-2"})
    assert refused.value.reason == "approval_quota"
    # the agent retries: each retry writes the record from the binding's copy, so it is the one announcing it
    found = [await request(book, arguments=arguments, now=T0 + 5) for arguments in invoices]
    assert [(a.id, a.state, created) for a, created in found] == [(e["id"], "pending", True) for e in listed]
    assert [a.id for a in await book.pending(T0 + 6)] == [e["id"] for e in listed]
    again = [await request(book, arguments=arguments, now=T0 + 7) for arguments in invoices]
    assert [(a.id, created) for a, created in again] == [(a.id, False) for a, _ in found]
    await vote(book, found[0][0], "carol", CAROL, "deny")  # a decision frees its place and its slot
    assert (await request(book, arguments={**ARGS, "invoice_id": "INV-2"}, now=T0 + 20))[1]


class BindingRaceStore(YieldingStore):
    """Identical requests interleave (YieldingStore); once one has lost the binding race, index writes fail before
    they run, so the loser cannot give its place back."""

    broken = False

    async def compare_and_set_json(
        self, key: str, expected_version: int, value: Mapping[str, Any], ttl_seconds: float
    ) -> bool:
        if self.broken and key == "approval_pending":
            raise StateUnavailable("state store unreachable", reason="state_error")
        written = await super().compare_and_set_json(key, expected_version, value, ttl_seconds)
        self.broken |= key.startswith("approval_binding:") and not written
        return written


async def test_the_loser_of_a_binding_race_writes_no_record_approvers_could_decide() -> None:
    """Review finding: the loser had written a pending record before losing the binding; listed (its place not
    given back), approvers could decide it to no effect. Now the binding comes first and the loser writes nothing
    but its place, which names no record."""
    store = BindingRaceStore()
    book = make_book(store)
    (first, one), (second, two) = await asyncio.gather(request(book), request(book))
    assert store.broken and first.id == second.id and one + two == 1
    index = await store.get_json("approval_pending")
    assert index is not None
    (loser,) = {e["id"] for e in index["ids"]} - {first.id}  # its place could not be given back
    assert await book.get(loser, T0 + 1) is None
    assert [a.id for a in await book.pending(T0 + 1)] == [first.id]
    with pytest.raises(NotFound):
        await vote(book, replace(first, id=loser), "carol", CAROL)


# --- covers -------------------------------------------------------------------------------------------------


async def test_covers_only_the_approved_binding() -> None:
    book = make_book()
    approval = await _approved(book)
    granted = await book.get(approval.id, T0 + 20)
    assert granted is not None
    base: dict[str, Any] = {
        "subject": "alice",
        "actor": AGENT,
        "tool": "approveExpense",
        "args_digest": DIGEST,
        "required": ("mfa", "manager_approval"),
        "now": T0 + 20,
    }
    assert covers(granted, **base)
    assert book.covers(granted, **base)
    for name, value in [
        ("subject", "bob"),
        ("actor", "spiffe://example.org/agents/travel-bot"),
        ("tool", "listInvoices"),
        ("args_digest", args_digest({**ARGS, "amount": 6001})),
        ("required", ("dual_approval",)),
        ("now", T0 + TTL),
    ]:
        assert not covers(granted, **{**base, name: value}), name
    assert not covers(approval, **base), "pending"


async def test_a_person_is_issuer_and_subject_for_the_binding() -> None:
    """``alice`` of another issuer is another person: she neither finds nor uses alice@A's approval."""
    book = make_book()
    first, created = await request(book, issuer="https://a.example")
    again, created_again = await request(book, issuer="https://a.example")
    other, created_other = await request(book, issuer="https://b.example")
    assert created and not created_again and again.id == first.id
    assert created_other and other.id != first.id and other.issuer == "https://b.example"
    await vote(book, first, "carol", CAROL)
    granted = await book.get(first.id, T0 + 20)
    assert granted is not None and granted.state == "approved"
    call: dict[str, Any] = {
        "subject": "alice",
        "actor": AGENT,
        "tool": "approveExpense",
        "args_digest": DIGEST,
        "required": ("manager_approval",),
        "now": T0 + 20,
    }
    assert covers(granted, **call, issuer="https://a.example")
    assert not covers(granted, **call, issuer="https://b.example")
    assert not covers(granted, **call)  # a token without a known issuer is not alice@A either


# --- four eyes across issuers ---------------------------------------------------------------------------------

API_ISS = "https://idp.example.org"  # the agents' and the API's access tokens
PAGE_ISS = "https://login.example.org"  # approvals.ui.issuer: the approvals page's login IdP


def dual_request(**changes: Any) -> Approval:
    """alice's ``dual_approval`` request, made with an access token of :data:`API_ISS`."""
    fields: dict[str, Any] = {
        "id": "A" * 22,
        "state": "pending",
        "required": ("dual_approval",),
        "tool": "approveExpense",
        "arguments": ARGS,
        "args_digest": DIGEST,
        "subject": "alice",
        "actor": AGENT,
        "reason": "",
        "created_at": T0,
        "expires_at": T0 + TTL,
        "policy_version": "pv1",
        "issuer": API_ISS,
        **changes,
    }
    return Approval(**fields)


def decide_pure(approval: Approval, iss: str, sub: str) -> Approval:
    return apply_decision(
        approval,
        approver_iss=iss,
        approver_sub=sub,
        approver_claims=CAROL,  # every one of them a manager with MFA
        decision="approve",
        eligible=ELIGIBILITY.for_approval(approval),
        now=T0 + 10,
    )


def test_one_sub_through_two_issuers_is_one_person() -> None:
    """The page votes as (approvals.ui.issuer, sub): the same ``sub`` there is the same person (refused)."""
    pending = dual_request()
    with pytest.raises(AccessDenied) as refused:
        decide_pure(pending, PAGE_ISS, "alice")  # the requester, signed in on the page
    assert refused.value.reason == "approval_self"
    one = decide_pure(pending, API_ISS, "carol")
    with pytest.raises(AccessDenied) as refused:
        decide_pure(one, PAGE_ISS, "carol")  # carol again, through the page
    assert refused.value.reason == "approval_already_decided"
    assert one.state == "pending" and one.unsatisfied() == ("dual_approval",)
    two = decide_pure(one, PAGE_ISS, "dave")  # another person, whichever issuer
    assert two.state == "approved" and [(v.iss, v.sub) for v in two.approvals] == [
        (API_ISS, "carol"),
        (PAGE_ISS, "dave"),
    ]


@pytest.mark.parametrize(
    ("votes", "covered"),
    [
        (((API_ISS, "carol"), (PAGE_ISS, "carol")), False),
        (((API_ISS, "carol"), (PAGE_ISS, "alice")), False),
        (((API_ISS, "carol"), (PAGE_ISS, "dave")), True),
    ],
    ids=["one-sub-twice", "requester-voted", "two-people"],
)
def test_an_approved_record_covers_only_with_distinct_approvers_besides_the_requester(
    votes: tuple[tuple[str, str], ...], covered: bool
) -> None:
    """A record approved before four eyes compared ``sub`` across issuers is re-counted, not trusted."""
    granted = dual_request(
        state="approved",
        approvals=tuple(Vote(sub, "approve", T0 + 10, ("dual_approval",), iss) for iss, sub in votes),
    )
    call: dict[str, Any] = {
        "subject": "alice",
        "actor": AGENT,
        "tool": "approveExpense",
        "args_digest": DIGEST,
        "required": ("dual_approval",),
        "now": T0 + 20,
        "issuer": API_ISS,
    }
    assert covers(granted, **call) is covered
    assert granted.unsatisfied() == (() if covered else ("dual_approval",))


# --- approver rules (CEL) -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "message"),
    [
        ("approver.groups.contains(", "invalid CEL"),
        ('"x" in approvr.groups', "undeclared reference 'approvr'"),
    ],
    ids=["syntax", "undeclared"],
)
def test_rules_that_do_not_compile_are_located(when: str, message: str) -> None:
    with pytest.raises(EligibilityCompileError) as failed:
        Eligibility.compile(Approvals(dual_approval=Approver(when=when)))
    [(location, text)] = failed.value.problems
    assert location == ("approvals", "dual_approval", "when") and message in text


@pytest.mark.parametrize(
    ("obligation", "claims", "when", "expected"),
    [
        ("manager_approval", CAROL, None, True),
        ("mfa", CAROL, None, False),
        ("security_review", CAROL, None, False),
        ("manager_approval", {}, None, False),
        ("manager_approval", CAROL, "approver.groups", False),
        ("manager_approval", CAROL, 'approver.groups.exists(g, g == "managers")', True),
        ("manager_approval", CAROL, '"managers" in approver.groups && request.args.amount < 5000', False),
        ("manager_approval", CAROL, 'request.tool == "approveExpense"', True),
    ],
    ids=[
        "member",
        "mfa-is-not-an-approval",
        "other-group",
        "error",
        "non-bool",
        "macro",
        "request-args",
        "tool",
    ],
)
def test_eligibility(obligation: str, claims: dict[str, Any], when: str | None, expected: bool) -> None:
    config = Approvals() if when is None else Approvals(manager_approval=Approver(when=when))
    view = {"tool": "approveExpense", "args": ARGS}
    assert Eligibility.compile(config).eligible(obligation, claims, view) is expected


# --- webhook notifier (no network: see tests/integration/test_approvals_api.py for deliveries) ------------


async def test_a_full_announcement_queue_drops_without_blocking() -> None:
    book = make_book()
    approval, _ = await request(book)
    results: list[str] = []
    async with aiohttp.ClientSession() as session:
        notifier = WebhookNotifier(
            session,
            Signer.from_jwk(generate_ec_jwk()),
            [Webhook(url="https://127.0.0.1:9/hook")],
            public_url="https://broker.example",
            queue_size=1,
            on_result=results.append,
        )
        notifier.announce(approval)  # worker not started: the queue keeps it
        notifier.announce(approval)
        await notifier.close()
    assert (notifier.dropped, results) == (1, ["dropped"])


async def test_backoff_grows_with_jitter_and_is_capped() -> None:
    async with aiohttp.ClientSession() as session:
        notifier = WebhookNotifier(
            session, Signer.from_jwk(generate_ec_jwk()), [], public_url="https://b", base_delay=0.5
        )
    for attempt, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (20, MAX_BACKOFF_SECONDS)]:
        delays = {notifier.backoff(attempt) for _ in range(50)}
        assert all(cap / 2 <= d <= cap for d in delays) and len(delays) > 1, attempt


async def test_announcement_claims_describe_the_request() -> None:
    approval, _ = await request(make_book())
    claims = announcement_claims(approval, public_url="https://broker.example", now=T0 + 1)
    assert claims == {
        "iss": "https://broker.example",
        "iat": int(T0 + 1),
        "exp": int(T0 + TTL),
        "approval_id": approval.id,
        "approval_url": f"https://broker.example/approvals/{approval.id}",
        "tool": "approveExpense",
        "arguments": ARGS,
        "requester": "alice",
        "agent": AGENT,
        "reason": "amount above 5000",
        "required": ["manager_approval"],
        "expires_at": rfc3339(T0 + TTL),
    }


# --- reload -------------------------------------------------------------------------------------------------


async def test_reconfigure_swaps_rules_only_when_they_compile() -> None:
    async with aiohttp.ClientSession() as session:
        service = ApprovalService.create(
            Approvals(), MemoryStore(), Signer.from_jwk(generate_ec_jwk()), session, Metrics(), "https://b"
        )
        new = Approvals(
            ttl_seconds=600,
            max_pending_listed=50,
            manager_approval=Approver(when='"finance" in approver.groups'),
        )
        service.reconfigure(new)
        assert (service.book.ttl_seconds, service.book.max_pending_listed) == (600, 50)
        assert service.eligibility.eligible("manager_approval", {"groups": ["finance"]})
        assert not service.eligibility.eligible("manager_approval", CAROL)
        with pytest.raises(EligibilityCompileError):
            service.reconfigure(Approvals(ttl_seconds=900, manager_approval=Approver(when="(")))
        assert service.book.ttl_seconds == 600
        assert service.eligibility.eligible("manager_approval", {"groups": ["finance"]})
        await service.close()
