"""The configuration schema (CONTRACT §2): strict pydantic models, one per section.

Unknown keys and wrong types are errors (``extra="forbid"``, strict types); the loader maps each error back
to ``FILE:LINE``. ``broker/config/schema.json`` is generated from these models (``python -m broker.config.schema``)
and shipped for editors. Path fields resolve relative paths against the config file's folder (``context['base_dir']``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from broker.state.redis_cluster import parse_redis_url

_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")
#: tool and MCP server names appear in URLs and metric labels: a closed, ASCII-only alphabet (HOSTILE T08).
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"

ASYMMETRIC_ALGS = ("ES256", "ES384", "EdDSA", "RS256", "PS256")
Alg = Literal["ES256", "ES384", "EdDSA", "RS256", "PS256"]


def _resolve_path(value: Any, info: ValidationInfo) -> Any:
    """Paths in the config are relative to the config file's folder (CONTRACT §2)."""
    if isinstance(value, str):
        if not value:
            raise ValueError("empty path")
        path = Path(value).expanduser()
        base = (info.context or {}).get("base_dir")
        if base is not None and not path.is_absolute():
            path = Path(os.path.normpath(Path(base) / path))
        return path
    return value


ConfigPath = Annotated[Path, BeforeValidator(_resolve_path)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def split_hostport(value: str) -> tuple[str, int]:
    match = _HOSTPORT.match(value)
    if not match:
        raise ValueError(f"expected host:port, got {value!r}")
    host, port = match.group(1).strip("[]"), int(match.group(2))
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host, port


HostPort = Annotated[str, Field(description="host:port, e.g. 127.0.0.1:8443 (port 0 = any free port)")]


class Limits(Strict):
    max_body_bytes: int = Field(1_048_576, ge=1, description="request body cap (413)")
    max_header_bytes: int = Field(16_384, ge=1024, description="total request header size cap (431)")
    max_header_line_bytes: int | None = Field(
        None,
        ge=256,
        description="longest request line or header line the HTTP parser reads (400/431 JSON beyond); "
        "default: max_header_bytes, so that one header (a large token) can use the whole header budget",
    )
    max_token_bytes: int = Field(8192, ge=256, description="access/txn token size cap (401 invalid_token)")
    max_json_depth: int = Field(32, ge=1, le=256, description="JSON nesting cap (400)")
    max_response_bytes: int = Field(8_388_608, ge=1, description="upstream response body cap (502)")

    @property
    def header_line_bytes(self) -> int:
        """The HTTP parser's line limit (aiohttp ``max_line_size``/``max_field_size``)."""
        return self.max_header_line_bytes or self.max_header_bytes


class ServerTls(Strict):
    cert: ConfigPath = Field(
        description="the broker's server certificate (PEM); also its client cert towards upstreams"
    )
    key: ConfigPath
    client_ca: ConfigPath = Field(description="trust bundle for agent X.509-SVIDs")
    client_cert: Literal["require", "optional"] = Field(
        "require",
        description="'require' refuses TLS without a client certificate; 'optional' lets humans (approvers) in "
        "without one, while agent routes still demand a valid SVID (401 invalid_client)",
    )
    min_version: Literal["1.2", "1.3"] = "1.2"
    reload_interval_seconds: float = Field(
        10.0,
        ge=0.5,
        le=3600,
        description="how often cert, key, bundle and signing key files are checked for rotation",
    )


class Server(Strict):
    listen: HostPort = "127.0.0.1:8443"
    public_url: str = Field(
        description="external base URL; DPoP htu and txn-token iss are built from it, never from Host"
    )
    admin_listen: HostPort = "127.0.0.1:9090"
    admin_token_file: ConfigPath | None = Field(
        None,
        description="file holding a bearer token that every admin endpoint but /healthz and /readyz requires "
        "(/admin/*, /metrics); set it whenever the admin listener is reachable beyond loopback",
    )
    tls: ServerTls
    limits: Limits = Limits()
    shutdown_grace_seconds: float = Field(10.0, ge=0, le=600)
    request_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="how long a connection may take to send a request's headers (and may stay idle), "
        "and to send its body (408)",
    )

    @field_validator("listen", "admin_listen")
    @classmethod
    def _hostport(cls, value: str) -> str:
        split_hostport(value)
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        if not re.match(r"^https://[^/?#]+(/[^?#]*)?$", value):
            raise ValueError("public_url must be an https:// URL without query or fragment")
        return value.rstrip("/")


class Issuer(Strict):
    issuer: str = Field(
        description="exact 'iss' value; alone, it enables OIDC / RFC 8414 discovery of jwks_uri"
    )
    jwks_file: ConfigPath | None = None
    jwks_url: str | None = None
    ca: ConfigPath | None = Field(
        None, description="CA bundle for fetching jwks_url / discovery (default: system CAs)"
    )
    algorithms: list[Alg] = Field(default_factory=lambda: list[Alg](["ES256"]), min_length=1)
    max_lifetime_seconds: int = Field(86_400, ge=60)
    accepted_typ: list[str] = Field(
        default_factory=lambda: ["at+jwt", "JWT", ""],
        description="accepted JWT 'typ' header values ('' = absent); dpop+jwt, grant+jwt, txntoken+jwt never",
    )

    @model_validator(mode="after")
    def _one_source(self) -> Issuer:
        if self.jwks_file is not None and self.jwks_url is not None:
            raise ValueError("give jwks_file or jwks_url, not both")
        return self


class Dpop(Strict):
    algorithms: list[Alg] = Field(default_factory=lambda: list[Alg](["ES256", "EdDSA"]), min_length=1)
    iat_window_seconds: int = Field(60, ge=5, le=600, description="how old a proof's iat may be")
    iat_skew_seconds: int = Field(5, ge=0, le=120, description="how far in the future a proof's iat may be")
    require_nonce: bool = False
    nonce_lifetime_seconds: int = Field(300, ge=10)
    nonce_secret: str | None = Field(
        None, description="shared HMAC secret so every replica accepts every replica's nonces (>= 32 chars)"
    )


class Identity(Strict):
    trust_domain: str = Field(description="SPIFFE trust domain of agents, e.g. example.org")
    audience: str = Field(description="required 'aud' of access tokens")
    proof: Literal["dpop", "mtls", "either"] = "dpop"
    leeway_seconds: int = Field(30, ge=0, le=60)
    issuers: list[Issuer] = Field(default_factory=list)
    dpop: Dpop = Dpop()


class State(Strict):
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str | None = None
    key_prefix: str = "broker:"
    timeout_ms: int = Field(200, ge=1, le=10_000)
    max_entries: int = Field(1_000_000, ge=1000, description="memory backend bound")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_redis_url(
                value
            )  # redis://, rediss://, redis+sentinel://, redis+cluster:// (ValueError says which)
        return value

    @model_validator(mode="after")
    def _redis_needs_url(self) -> State:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("state.backend redis needs state.redis_url")
        return self


class Signing(Strict):
    key_file: ConfigPath = Field(
        description="the broker's private JWK (grants, txn tokens, audit checkpoints)"
    )
    previous_key_files: list[ConfigPath] = Field(
        default_factory=list, description="still published in jwks.json"
    )


class Audit(Strict):
    file: ConfigPath | None = Field(
        None, description="the audit log file (one chain per process; the default store): set this or store"
    )
    store: str | None = Field(
        None,
        description="postgresql://… (libpq URL, e.g. ${BROKER_AUDIT_STORE} from a Secret): write the chain to "
        "PostgreSQL instead of a file, one chain per broker process (deploy/operations.md)",
    )
    store_timeout_seconds: float = Field(
        2.0,
        gt=0,
        le=60,
        description="bound of a PostgreSQL connect and of each group commit; past it the waiting calls are "
        "refused (503 audit_unavailable) and the broker reconnects",
    )
    checkpoint_every: int = Field(100, ge=1, description="a signed checkpoint after this many records")
    checkpoint_seconds: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="and one at most this many seconds after any record, idle or not (bounds the unsigned tail)",
    )
    fsync: bool = Field(
        True,
        description="group commit: a decision is acknowledged only once an fsync covering its record has completed "
        "(one fsync shared by every record written meanwhile); false only for benchmarks",
    )
    min_free_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="/readyz turns not ready (audit_disk_low) when the audit file's filesystem has less free "
        "space than this (bytes; 0 turns the check off; not used with audit.store)",
    )

    @field_validator("store")
    @classmethod
    def _postgresql_url(cls, value: str | None) -> str | None:
        # the URL may carry a password: never echo it in the error
        if value is not None and not re.match(r"^postgres(ql)?://", value):
            raise ValueError("audit.store must be a postgresql:// URL")
        return value

    @model_validator(mode="after")
    def _one_store(self) -> Audit:
        if (self.file is None) == (self.store is None):
            raise ValueError("set exactly one of audit.file (a log file) and audit.store (postgresql://…)")
        return self


class UpstreamTls(Strict):
    ca: ConfigPath | None = Field(
        None, description="CA bundle for the upstream's certificate (default: server.tls.client_ca)"
    )
    cert: ConfigPath | None = Field(
        None, description="client certificate towards the upstream (default: server.tls.cert)"
    )
    key: ConfigPath | None = None


class Upstream(Strict):
    url: str
    tls: UpstreamTls = UpstreamTls()
    timeout_seconds: float = Field(10.0, gt=0, le=300)
    connect_timeout_seconds: float = Field(3.0, gt=0, le=60)

    @field_validator("url")
    @classmethod
    def _https(cls, value: str) -> str:
        if not re.match(r"^https://[^/?#]+(/[^#]*)?$", value):
            raise ValueError("upstream url must be https:// (the broker forwards over mTLS only)")
        return value


class Mask(Strict):
    path: str = Field(description="dotted path; '[]' walks arrays, e.g. invoices[].vendor.bank_account")
    keep_last: int = Field(4, ge=0, le=64)


class RowFilter(Strict):
    path: str = Field(description="dotted path of an array in the response, e.g. invoices")
    keep: str = Field(description="CEL over `row`, subject, actor: rows where it is not true are dropped")


class ResponseFilters(Strict):
    """Applied to the backend's JSON before the agent sees it; an unparseable body is refused (502)."""

    mask: list[Mask] = Field(default_factory=list)
    drop: list[str] = Field(default_factory=list, description="dotted paths removed from the response")
    filter_rows: list[RowFilter] = Field(default_factory=list)


class Tool(Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: str = ""
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    upstream: Upstream
    txn_token: Literal["required", "edge"] = Field(
        "edge",
        description="'required': the agent must present a txn token; 'edge': the broker mints one per call",
    )
    audit_fields: list[str] = Field(
        default_factory=list, description="argument names copied verbatim into audit"
    )
    inject: dict[str, str] = Field(
        default_factory=dict,
        description="server-side arguments: name -> CEL over subject/actor, overriding what the agent sent",
    )
    response: ResponseFilters = Field(default_factory=lambda: ResponseFilters())


class McpTool(Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    digest: str | None = Field(
        None,
        description="pinned SHA-256 (hex) of the tool's definition (name, description, inputSchema, RFC 8785); "
        "absent: pinned at first sight (in the state store, shared by every replica)",
    )


class McpServer(Strict):
    """An upstream MCP server fronted at /mcp/{name}. Its tools are governed by the policies of the same names;
    a tool not listed here is never shown or callable (and policies may only name listed tools)."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    upstream: Upstream
    tools: list[McpTool] = Field(default_factory=list)
    allowed_origins: list[str] = Field(
        default_factory=list, description="Origin header values accepted (MCP transport: validate Origin)"
    )
    max_sessions_per_principal: int = Field(
        64,
        ge=1,
        le=500,
        description="MCP sessions (2025 era) one (subject, actor) may hold on this server, across all replicas; "
        "opening one more evicts that principal's oldest (its later requests get 404 Session not found)",
    )
    max_streams_per_principal: int = Field(
        8,
        ge=1,
        le=256,
        description="GET streams (2025 era) one (subject, actor) may hold open on this server through one broker "
        "process; one more is refused with 429 rate_limited until one ends (the upstream connection pool, 256 "
        "per process, is shared by every agent)",
    )


Obligation = Literal["mfa", "manager_approval", "dual_approval", "security_review"]


class Policy(Strict):
    """A policy rule, compiled at load by ``broker.policy`` (CEL). Deny by default: a tool is usable only if an
    ``allow`` rule matches; ``deny`` rules refuse (a deny always beats an obligation); ``obligate`` rules attach
    step-up and approval obligations. ``allow`` rules decide *who* may use a tool and must not read ``args`` —
    so discovery (no arguments) and invocation agree on what is visible."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    description: str = ""
    tools: list[str] = Field(min_length=1, description="tool names this rule applies to ('*' = all)")
    effect: Literal["allow", "deny", "obligate"] = "allow"
    when: str = Field(
        "true", description="CEL condition over subject, actor, tool, args, risk, counters, now"
    )
    reason: str = Field(
        "", description="what the agent is told when this rule refuses or obligates (never other policy)"
    )
    requires: list[Obligation] = Field(
        default_factory=list, description="obligate rules: what must happen first"
    )
    constraints: dict[str, str] = Field(
        default_factory=dict,
        description="allow rules: grant constraints, name -> CEL expression evaluated at discovery (no args)",
    )

    @model_validator(mode="after")
    def _shape(self) -> Policy:
        if self.effect == "obligate" and not self.requires:
            raise ValueError("an obligate rule needs 'requires'")
        if self.effect != "obligate" and self.requires:
            raise ValueError("'requires' belongs to obligate rules")
        if self.effect != "allow" and self.constraints:
            raise ValueError("'constraints' belong to allow rules (they describe the grant)")
        return self


class Counter(Strict):
    """A sliding-window counter of *allowed* invocations, usable in CEL as ``counters.<name>.count`` / ``.sum``."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
    tools: list[str] = Field(min_length=1)
    scope: Literal["subject", "actor", "subject_actor"] = "subject"
    window_seconds: int = Field(ge=1, le=31 * 86400)
    sum: str | None = Field(None, description="argument whose numeric value is summed (e.g. amount)")


class Approver(Strict):
    when: str = Field(description="CEL over `approver` (the approving human's claims) and `request`")


class Webhook(Strict):
    url: str
    ca: ConfigPath | None = None
    timeout_seconds: float = Field(5.0, gt=0, le=60)
    format: Literal["jws", "slack"] = Field(
        "jws",
        description="'jws': the announcement signed by the broker key (application/jose); 'slack': "
        "Slack-compatible incoming-webhook JSON carrying the approval link",
    )


class ApprovalsUi(Strict):
    """The approvals page (CONTRACT §14): OpenID Connect login at one of ``identity.issuers``."""

    issuer: str = Field(
        description="an issuer of identity.issuers; its discovery document names the endpoints"
    )
    client_id: str = Field(min_length=1, max_length=256)
    client_secret_file: ConfigPath | None = Field(
        None,
        description="file holding the client secret (client_secret_basic); absent: a public client (PKCE)",
    )
    session_seconds: int = Field(
        28_800, ge=300, le=28_800, description="browser session lifetime (at most 8 h)"
    )


class Approvals(Strict):
    ttl_seconds: int = Field(
        3600, ge=60, le=7 * 86400, description="how long a pending or granted approval lives"
    )
    # the ceiling is broker.txn.approvals.MAX_PENDING_LISTED: the shared index is one store record (64 KiB cap)
    max_pending_listed: int = Field(
        1000,
        ge=1,
        le=1000,
        description="pending approvals listed to approvers, all principals together, across all replicas; when "
        "the listing is full a new approval request is 429 rate_limited (approval_pending_full) until one is "
        "decided or expires. At most 1000, so the listing fits one state-store record (64 KiB); a reload applies "
        "it to new requests",
    )
    manager_approval: Approver = Approver(when='"managers" in approver.groups')
    dual_approval: Approver = Approver(when='"managers" in approver.groups')
    security_review: Approver = Approver(when='"security" in approver.groups')
    webhooks: list[Webhook] = Field(default_factory=list)
    ui: ApprovalsUi | None = Field(None, description="the approvals page at /approvals/ (OIDC login)")


class Tracing(Strict):
    """OpenTelemetry spans over OTLP/HTTP (CONTRACT §16); absent, the broker traces nothing and loads no SDK."""

    otlp_endpoint: str = Field(
        description="the collector's OTLP/HTTP URL, e.g. http://127.0.0.1:4318 (/v1/traces is added to a URL "
        "without a path)"
    )
    sample_ratio: float = Field(
        ge=0,
        le=1,
        description="share of new traces kept (a caller's traceparent sampled flag is honoured): 0 exports none",
    )
    service_name: str = Field("broker", min_length=1, max_length=128, description="the service.name resource")
    parent_sampling: bool = Field(
        True,
        description="honour a caller's traceparent sampled flag (OpenTelemetry's default); false: sample_ratio "
        "decides every trace, so callers — unauthenticated ones too — cannot make the broker export all of theirs",
    )

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/?#@\s]+(/[^?#\s]*)?$", value):
            raise ValueError("otlp_endpoint must be an http(s):// URL (OTLP/HTTP), without credentials")
        return value


class Observability(Strict):
    tracing: Tracing | None = Field(None, description="OpenTelemetry tracing; absent: off, at no cost")


class Config(Strict):
    version: Literal[1]
    server: Server
    identity: Identity
    state: State = State()
    signing: Signing
    audit: Audit
    tools: list[Tool] = Field(default_factory=list)
    mcp_servers: list[McpServer] = Field(default_factory=list)
    policies: list[Policy] = Field(default_factory=list)
    shadow_policies: list[Policy] | None = Field(
        None,
        description="candidate policy set evaluated beside the active one; disagreements logged and counted",
    )
    counters: list[Counter] = Field(default_factory=list)
    approvals: Approvals = Approvals()
    observability: Observability = Observability()

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        for kind, names in (
            ("tool", [t.name for t in self.tools]),
            ("mcp server", [m.name for m in self.mcp_servers]),
            ("policy", [p.id for p in self.policies]),
        ):
            seen: set[str] = set()
            for name in names:
                if name in seen:
                    raise ValueError(f"duplicate {kind} name {name!r}")
                seen.add(name)
        return self

    @model_validator(mode="after")
    def _ui_issuer(self) -> Config:
        ui = self.approvals.ui
        if ui is not None and ui.issuer not in {i.issuer for i in self.identity.issuers}:
            raise ValueError(f"approvals.ui.issuer {ui.issuer!r} is not one of identity.issuers")
        return self

    def tool(self, name: str) -> Tool | None:
        for tool in self.tools:
            if tool.name == name:
                return tool
        return None
