"""What an agent may see and call through ``/mcp/{server}``: the same decisions as ``/v1`` (CONTRACT §6, §7).

``tools/list`` shows a tool iff it is configured for the server, its definition matches its pin
(:mod:`broker.mcp.pins`) and policy lets this (subject, actor) see it — the visibility decision of
``/v1/tools``. ``tools/call`` is authorised in the order of ``/v1`` invocation, each refusal a JSON-RPC error
(HTTP 200: MCP clients handle HTTP errors badly) whose ``data`` says what would make it pass:

1 visible     configured ∧ pinned (and listed lately) ∧ visible — else exactly the unknown-tool error (-32602),
              before the arguments are read, so a schema error cannot reveal a hidden tool (HOSTILE P21); a
              revoked grant is found by the final guard and answered the same way;
2 arguments   an object valid against the *pinned* upstream input schema, and against the ``/v1`` tool's
              schema when one of the same name is configured (policy only sees well-typed arguments);
3 policy      deny rules first: ``-32010`` with the violated constraint (a deny beats any obligation);
4 step-up     ``mfa`` without MFA: ``-32011`` with ``acr_values``;
5 approvals   an approval bound to exactly (subject, actor, tool, args digest) must be granted, else ``-32012``
              (or, for 2025-11-25 clients that declared it, URL-mode elicitation ``-32042``) naming it;
6 injection   the ``/v1`` tool of the same name's ``inject`` sets server-side arguments.

The edge txn token binds the agent's arguments (before injection) and lists the injected values (``tctx``).
What the agent gets back is shaped in :mod:`broker.mcp.answers`.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jsonschema
from aiohttp import web

from broker.canonical import canonicalize
from broker.context import CTX
from broker.errors import AccessDenied
from broker.gateway.approvals import APPROVALS
from broker.gateway.filters import ToolFilters
from broker.gateway.stages import approval_for_call, has_mfa, mint_for_call, policy_env, visible_names
from broker.identity.principal import Principal
from broker.jose import b64url_encode
from broker.mcp import jsonrpc as rpc
from broker.mcp.params import check_param_headers
from broker.mcp.pins import PinBook
from broker.mcp.upstream import McpUpstream
from broker.policy.engine import Decision
from broker.runtime import Runtime

__all__ = [
    "AuthorizedCall",
    "Refusal",
    "authorize_call",
    "mint_edge_token",
    "unknown_tool",
    "visible_tools",
]


class Refusal(rpc.JsonRpcError):
    """A policy refusal of a ``tools/call``: a JSON-RPC error sent with HTTP 200 and audited as ``decision``."""

    def __init__(
        self,
        code: int,
        message: str,
        reason: str,
        *,
        decision: str,
        data: Any = None,
        label: str | None = None,
    ) -> None:
        super().__init__(code, message, reason, http_status=200, data=data)
        self.decision = decision
        #: the bounded ``code`` label of broker_requests_total (the broker error code this refusal stands for)
        self.label = label or (
            str(data["error"]) if isinstance(data, dict) and "error" in data else "invalid_request"
        )


def unknown_tool(name: str, reason: str) -> Refusal:
    # identical for a missing, unconfigured, hidden, drifted or revoked tool: only ``reason`` (audit) differs
    return Refusal(rpc.UNKNOWN_TOOL, f"Unknown tool: {name}", reason, decision="deny", label="unknown_tool")


async def visible_tools(
    request: web.Request, runtime: Runtime, principal: Principal, upstream: McpUpstream
) -> frozenset[str]:
    """The configured tools of ``upstream`` policy lets this (subject, actor) see, minus revoked grants."""
    names = list(upstream.digests)
    if not names:
        return frozenset()
    env, _ = await policy_env(request, runtime, principal, names, int(time.time()))
    return frozenset(await visible_names(request, runtime, principal, names, env))


@dataclass(frozen=True)
class AuthorizedCall:
    name: str
    #: the agent's arguments (what the decision, the digest and the txn token are about)
    arguments: dict[str, Any]
    #: what the upstream receives: arguments after server-side injection
    forwarded: dict[str, Any]
    schema: dict[str, Any]
    filters: ToolFilters | None
    approval_id: str | None


def _schema_error(validator: Any, arguments: dict[str, Any]) -> str | None:
    if validator.is_valid(arguments):  # the common case, without collecting every error
        return None
    error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
    if error is None:
        return None
    where = "arguments" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return f"{where}: {error.message}"[:300]


class _Verdicts:
    """A bounded memo of schema verdicts by (validator, RFC 8785 bytes of the arguments).

    Validation is a pure function of the schema and the value, and the canonical bytes identify the value (up
    to number spelling, which JSON Schema does not distinguish either); agents repeat the same arguments often,
    and jsonschema costs ~100 µs per call. Small arguments only."""

    MAX_ENTRIES = 4096
    MAX_BYTES = 2048

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[int, bytes], tuple[Any, str | None]] = OrderedDict()

    def error(self, validator: Any, arguments: dict[str, Any], canonical: bytes) -> str | None:
        if len(canonical) > self.MAX_BYTES:
            return _schema_error(validator, arguments)
        key = (id(validator), canonical)
        hit = self._entries.get(key)
        if hit is not None and hit[0] is validator:  # an id can be reused after its validator is gone
            self._entries.move_to_end(key)
            return hit[1]
        verdict = _schema_error(validator, arguments)
        self._entries[key] = (validator, verdict)
        if len(self._entries) > self.MAX_ENTRIES:
            self._entries.popitem(last=False)
        return verdict


_verdicts = _Verdicts()


async def authorize_call(
    request: web.Request,
    runtime: Runtime,
    principal: Principal,
    upstream: McpUpstream,
    message: rpc.Message,
    *,
    pins: PinBook,
    refresh: Callable[[], Awaitable[None]],
    max_catalog_age: float,
    url_elicitation: bool,
    param_headers: list[tuple[str, str]] | None,
) -> AuthorizedCall:
    """Stages 1–6 of the module docstring; raises :class:`Refusal` (or a BrokerError for store failures)."""
    ctx = request[CTX]
    name = message.params.get("name")
    arguments = message.params.get("arguments", {})
    if not isinstance(name, str):
        raise Refusal(rpc.INVALID_PARAMS, "params.name must be a string", "call_name_type", decision="deny")
    if name not in upstream.digests:
        raise unknown_tool(name, "unknown_tool")
    ctx.tool = name
    configured = upstream.digests[name]
    usable = pins.usable(upstream.name, name, configured)
    if usable is None or time.time() - usable.seen_at > max_catalog_age:
        await refresh()  # the broker's own listing: first sight, or a pin not re-checked for a while
        usable = pins.usable(upstream.name, name, configured)
    if usable is None or time.time() - usable.seen_at > max_catalog_age:  # drifted, invalid, or not listed
        raise unknown_tool(name, "tool_unpinned_or_drifted")
    now = int(time.time())
    env, _ = await policy_env(request, runtime, principal, [name], now)  # 1
    visibility = runtime.policies.visibility(name, env)
    if visibility.outcome != "allow":
        raise unknown_tool(name, f"hidden: {visibility.reason}"[:200])
    if not isinstance(arguments, dict):  # 2
        raise Refusal(
            rpc.INVALID_PARAMS, "arguments must be an object", "arguments_not_object", decision="deny"
        )
    tool = runtime.tools.get(name)
    canonical = canonicalize(arguments)
    for validator in (usable.validator, tool.validator if tool is not None else None):
        problem = _verdicts.error(validator, arguments, canonical) if validator is not None else None
        if problem is not None:
            raise Refusal(
                rpc.INVALID_PARAMS, f"Invalid arguments: {problem}", "arguments_schema", decision="deny"
            )
    schema = usable.definition.get("inputSchema") or {}
    if param_headers is not None:  # 2026-07-28: Mcp-Param-* mirror the agent's arguments (-32020 otherwise)
        check_param_headers(schema, arguments, param_headers)
    ctx.args_digest = b64url_encode(hashlib.sha256(canonical).digest())  # CONTRACT §5 args_digest
    if tool is not None:
        ctx.audit_args = {k: arguments[k] for k in tool.config.audit_fields if k in arguments} or None
    env.bind_args(arguments)  # 3
    decision = runtime.policies.decide(name, env)
    if decision.outcome == "hidden":
        raise unknown_tool(name, f"hidden: {decision.reason}"[:200])
    if decision.outcome == "deny":
        data = {"error": "access_denied", "rule": decision.rule, "constraint": decision.message}
        raise Refusal(
            rpc.ACCESS_DENIED,
            decision.message,
            f"{decision.rule}: {decision.reason}"[:300],
            decision="deny",
            data=data,
        )
    # the reasons of the obligate rules that fired (aligned with decision.obligation_rules, not obligations)
    reasons = "; ".join(r for r in decision.obligation_reasons if r)
    if "mfa" in decision.obligations and not has_mfa(principal.claims):  # 4
        why = reasons or "this call needs multi-factor authentication"
        data = {
            "error": "insufficient_user_authentication",
            "acr_values": "mfa",
            "reason": why,
            "resource_metadata": runtime.challenge.resource_metadata,
        }
        raise Refusal(rpc.STEP_UP_REQUIRED, why, "mfa_required", decision="step_up", data=data)
    approval_id = await _approvals(
        request, runtime, principal, name, arguments, decision, reasons, url_elicitation
    )
    filters = tool.filters if tool is not None else None
    forwarded = dict(arguments)
    if filters is not None:  # 6
        try:
            forwarded = filters.inject(arguments, subject=principal.claims, actor_id=principal.actor_id)
        except AccessDenied as exc:  # a server-side argument that cannot be computed refuses the call
            data = {"error": "access_denied", "constraint": exc.description}
            raise Refusal(rpc.ACCESS_DENIED, exc.description, exc.reason, decision="deny", data=data) from exc
    return AuthorizedCall(name, arguments, forwarded, schema, filters, approval_id)


async def _approvals(
    request: web.Request,
    runtime: Runtime,
    principal: Principal,
    name: str,
    arguments: dict[str, Any],
    decision: Decision,
    reasons: str,
    url_elicitation: bool,
) -> str | None:
    """Stage 5: the id of the granted approval covering exactly this call, else a refusal naming it."""
    state = await approval_for_call(request, runtime, principal, name, arguments, decision)
    if state is None:
        return None
    if state.covered:
        return str(state.approval.id)
    approval, required = state.approval, state.required
    url = request.app[APPROVALS].approval_url(approval.id)
    message = reasons or "this call needs approval"
    data: dict[str, Any] = {
        "error": "approval_required",
        "approval_id": approval.id,
        "approval_url": url,
        "required": list(required),
    }
    reason = f"approval_required: {', '.join(required)}"
    if url_elicitation:
        # 2025-11-25 URLElicitationRequiredError: the client sends its user to the URL, then retries the call
        data["elicitations"] = [{"mode": "url", "elicitationId": approval.id, "url": url, "message": message}]
        raise Refusal(rpc.URL_ELICITATION_REQUIRED, message, reason, decision="pending", data=data)
    raise Refusal(rpc.APPROVAL_REQUIRED, message, reason, decision="pending", data=data)


def mint_edge_token(
    request: web.Request, runtime: Runtime, principal: Principal, call: AuthorizedCall
) -> str:
    """The txn token the upstream gets for this call (CONTRACT §5 propagation), recorded in the request record."""
    injected = {k: call.forwarded[k] for k, _ in call.filters.injections} if call.filters else None
    return mint_for_call(
        request, runtime, principal, call.name, call.arguments, injected, approval_id=call.approval_id
    ).token
