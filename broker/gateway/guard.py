"""The last check before a decision takes effect: revocations, then replay and single use, in ONE store step.

Why last and why one step: a request refused by any earlier stage must not burn its DPoP ``jti`` or consume its
txn token (HOSTILE S07), and the revocation check, the replay cache and single use must each hold on every
replica at once — one atomic store operation (one Redis round trip) gives all three. A store that does not
answer refuses the request (503 ``state_unavailable``, S01): there is never a local fallback.

One exception to "last": a tool call refused with ``approval_required`` has filed an approval, a side effect a
revoked principal or a replayed proof must not get — its guard runs before the approval is requested
(:class:`CallGuard`), and that refusal consumes its proof.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.errors import AccessDenied, InvalidDpopProof, InvalidToken, InvalidTxnToken, UnknownTool
from broker.identity.principal import Principal
from broker.observability import Metrics
from broker.state.base import StateStore


def grant_id(subject: str, actor_id: str | None, tool: str) -> str:
    """What ``POST /admin/revocations`` with kind ``grant`` names: one (subject, actor, tool) permission."""
    return f"{subject}|{actor_id or ''}|{tool}"


async def final_guard(
    store: StateStore,
    metrics: Metrics,
    principal: Principal,
    *,
    tool: str | None = None,
    txn: tuple[str, str, float] | None = None,
    policy_version: str | None = None,
    claim_proof: bool = True,
    claim_txn: bool = True,
) -> None:
    """Refuse if anything about this request was revoked; else record its proof and txn token as used.

    ``txn`` is (txn id, store key, ttl) of a presented transaction token; ``policy_version`` the version the
    call's txn token was minted under (the presented one's) or is about to be (CONTRACT §17).
    ``claim_proof=False``: the proof was claimed by an earlier step of this request (:class:`CallGuard`);
    ``claim_txn=False``: the txn token's revocation is checked but the token is not consumed.
    """
    revocations = principal.revocation_kinds()
    if policy_version is not None:
        revocations["policy_version"] = policy_version
    if tool is not None:
        revocations["grant"] = grant_id(principal.subject, principal.actor_id, tool)
    claims: list[tuple[str, float]] = []
    kinds: list[str] = []
    if principal.replay is not None and claim_proof:
        claims.append(principal.replay)
        kinds.append("dpop")
    if txn is not None:
        revocations["txn"] = txn[0]
        if claim_txn:
            claims.append((txn[1], txn[2]))
            kinds.append("txn")
    found = await store.guard(revocations, claims)
    if found.revoked == "grant":
        # a revoked permission makes the tool invisible to this pair: answered like a missing tool
        raise UnknownTool("no such tool", reason="grant_revoked", rpc_message=f"Unknown tool: {tool}")
    if found.revoked == "txn":
        raise InvalidTxnToken("transaction token has been revoked", reason="txn_revoked")
    if found.revoked == "policy_version":
        if (
            txn is None
        ):  # nothing is minted under a revoked version: the operator loads (or rolls back to) another
            raise AccessDenied(
                "the policy in force has been revoked; try again later", reason="revoked_policy_version"
            )
        raise InvalidTxnToken("transaction token has been revoked", reason="revoked_policy_version")
    if found.revoked is not None:
        raise InvalidToken("access token has been revoked", reason=f"revoked_{found.revoked}")
    if found.replayed is not None:
        if kinds[found.replayed] == "dpop":
            metrics.dpop_replays.inc()
            raise InvalidDpopProof("DPoP proof was already used", reason="dpop_replay")
        raise InvalidTxnToken("transaction token was already used", reason="txn_replayed")


@dataclass(slots=True)
class CallGuard:
    """The guard of one tool call (``broker.gateway.pipeline`` stages 6 and 8), as one store step either way.

    A call refused with ``approval_required`` has acted: it filed (or re-named) an approval — a record, a slot
    of the principal's pending quota, webhooks, the approvers' list. So :meth:`before_approval` runs before an
    approval is requested: revocations (the same ones, answered the same way) and the DPoP proof's claim, so a
    revoked principal files nothing and one proof files at most once. The txn token is only checked there, not
    consumed (the call is refused, S07). :meth:`final` is the last check of a call that goes through; a call
    that ran :meth:`before_approval` (an approval found by its binding) does not claim its proof twice."""

    store: StateStore
    metrics: Metrics
    principal: Principal
    tool: str
    #: (txn id, store key, ttl) of the presented txn token, as :func:`final_guard` takes it
    txn: tuple[str, str, float] | None
    policy_version: str
    #: the request's proof is claimed and its revocations checked (by either step)
    passed: bool = False

    async def before_approval(self) -> None:
        if self.passed:  # this request already passed (an approval requested after the final step)
            return
        await self._check(claim_proof=True, claim_txn=False)

    async def final(self) -> None:
        if self.passed and self.txn is None:
            return  # before_approval checked every revocation this step would, and claimed the proof
        await self._check(claim_proof=not self.passed, claim_txn=True)

    async def _check(self, *, claim_proof: bool, claim_txn: bool) -> None:
        await final_guard(
            self.store,
            self.metrics,
            self.principal,
            tool=self.tool,
            txn=self.txn,
            policy_version=self.policy_version,
            claim_proof=claim_proof,
            claim_txn=claim_txn,
        )
        self.passed = True
