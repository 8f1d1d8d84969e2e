"""The BrokerError family: every refusal the broker can give, with its HTTP status and stable code.

Stages raise these; each transport renders them once: ``broker.gateway.middleware`` as HTTP JSON bodies with
``WWW-Authenticate`` headers, ``broker.mcp.endpoint`` as JSON-RPC errors (``jsonrpc_code``, ``rpc_message`` and
``rpc_data``: what an MCP client is told would make the call pass) — and both hand them to audit.
``description`` is what the client sees (short, never echoing tokens or backend internals); ``reason`` is the
precise cause that goes to the audit record and to
``broker_auth_failures_total{reason}``. Never match on message text: match on the class or ``code``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class BrokerError(Exception):
    status: int = 500
    code: str = "server_error"
    #: ``DPoP``/``Bearer`` when the error is an RFC 6750/9449 authentication challenge.
    challenge: ClassVar[str | None] = None
    #: the JSON-RPC error code of this refusal on ``/mcp`` (CONTRACT §7): -32603 internal error by default
    jsonrpc_code: int = -32603

    #: the subject of a genuine access token whose presentation was refused (identity sets it), so the refusal
    #: is recorded in full under that subject rather than as unauthenticated noise (CONTRACT §15)
    verified_subject: str | None = None

    def __init__(
        self,
        description: str,
        *,
        reason: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
        challenge_params: dict[str, str] | None = None,
        rpc_message: str | None = None,
        rpc_data: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(description)
        self.description = description
        #: machine-friendly, precise cause for audit and metrics, e.g. ``dpop_htu_mismatch``
        self.reason = reason or self.code
        self.headers = dict(headers or {})
        #: extra members of the JSON error body (e.g. ``approval_id``)
        self.extra = dict(extra or {})
        #: extra ``WWW-Authenticate`` parameters (e.g. ``acr_values``)
        self.challenge_params = dict(challenge_params or {})
        #: the JSON-RPC ``message`` when it differs from ``description`` (MCP clients expect "Unknown tool: x")
        self.rpc_message = rpc_message or description
        #: JSON-RPC ``data`` members beyond ``error`` and ``extra`` (e.g. the violated rule)
        self.rpc_data = dict(rpc_data or {})

    def body(self, request_id: str) -> dict[str, Any]:
        return {
            "error": self.code,
            "error_description": self.description,
            **self.extra,
            "request_id": request_id,
        }

    def jsonrpc_data(self) -> dict[str, Any] | None:
        """``error.data`` of the JSON-RPC rendering: the code, then what would make the call pass (its challenge
        parameters, e.g. ``acr_values``, included)."""
        return {"error": self.code, **self.rpc_data, **self.extra, **self.challenge_params}


class InvalidRequest(BrokerError):
    status = 400
    code = "invalid_request"
    jsonrpc_code = -32602

    def jsonrpc_data(self) -> dict[str, Any] | None:
        return None  # -32602 is a protocol error: it carries no remediation


class InvalidGrant(BrokerError):
    """RFC 6749 §5.2 / RFC 8693 §2.2.2: the subject_token is not the one authenticating this request."""

    status = 400
    code = "invalid_grant"


class UnsupportedGrantType(BrokerError):
    status = 400
    code = "unsupported_grant_type"


class InvalidScope(BrokerError):
    status = 400
    code = "invalid_scope"


class InvalidTarget(BrokerError):
    """RFC 8693 §2.2.2: the requested audience or token type is not one we issue."""

    status = 400
    code = "invalid_target"


class InvalidAuthorizationDetails(BrokerError):
    """RFC 9396 §5: ``authorization_details`` of an unknown type, with unknown or ill-typed members, or invalid
    values (the token exchange's one ``tool_invocation`` entry)."""

    status = 400
    code = "invalid_authorization_details"
    jsonrpc_code = -32602


class InvalidClient(BrokerError):
    """No client certificate, or one that is not a valid X.509-SVID of the trust domain."""

    status = 401
    code = "invalid_client"


class InvalidToken(BrokerError):
    status = 401
    code = "invalid_token"
    challenge = "DPoP"


class InvalidDpopProof(BrokerError):
    status = 401
    code = "invalid_dpop_proof"
    challenge = "DPoP"


class UseDpopNonce(BrokerError):
    status = 401
    code = "use_dpop_nonce"
    challenge = "DPoP"


class InsufficientUserAuthentication(BrokerError):
    status = 401
    code = "insufficient_user_authentication"
    jsonrpc_code = -32011

    def jsonrpc_data(self) -> dict[str, Any] | None:
        return {**(super().jsonrpc_data() or {}), "reason": self.description}

    challenge = "DPoP"


class AccessDenied(BrokerError):
    status = 403
    code = "access_denied"
    jsonrpc_code = -32010

    def jsonrpc_data(self) -> dict[str, Any] | None:
        return {"constraint": self.description, **(super().jsonrpc_data() or {})}


class ApprovalRequired(BrokerError):
    status = 403
    code = "approval_required"
    jsonrpc_code = -32012


class InvalidTxnToken(BrokerError):
    status = 403
    code = "invalid_txn_token"
    jsonrpc_code = -32010


class TxnTokenMismatch(BrokerError):
    status = 403
    code = "txn_token_mismatch"
    jsonrpc_code = -32010


class UnknownTool(BrokerError):
    status = 404
    code = "unknown_tool"
    jsonrpc_code = -32602

    def jsonrpc_data(self) -> dict[str, Any] | None:
        return None  # -32602 is a protocol error: it carries no remediation


class NotFound(BrokerError):
    status = 404
    code = "not_found"


class MethodNotAllowed(BrokerError):
    status = 405
    code = "method_not_allowed"


class RequestTimeout(BrokerError):
    status = 408
    code = "request_timeout"


class PayloadTooLarge(BrokerError):
    status = 413
    code = "payload_too_large"
    jsonrpc_code = -32600


class UnsupportedMediaType(BrokerError):
    status = 415
    code = "unsupported_media_type"
    jsonrpc_code = -32600


class HeadersTooLarge(BrokerError):
    status = 431
    code = "request_header_fields_too_large"


class RateLimited(BrokerError):
    status = 429
    code = "rate_limited"
    jsonrpc_code = -32010


class UpstreamError(BrokerError):
    status = 502
    code = "upstream_error"
    jsonrpc_code = -32603


class StateUnavailable(BrokerError):
    """The state store (replay cache, single use, counters) did not answer: fail closed."""

    status = 503
    code = "state_unavailable"


class AuditUnavailable(BrokerError):
    """The audit record could not be written: the call is refused, never forwarded unaudited."""

    status = 503
    code = "audit_unavailable"


class ShuttingDown(BrokerError):
    status = 503
    code = "shutting_down"


class UpstreamTimeout(BrokerError):
    status = 504
    code = "upstream_timeout"
