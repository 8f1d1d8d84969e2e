"""broker.sdk.backend: the Txn-Token middleware for aiohttp tool backends, on real sockets (CONTRACT §5 "Propagation").

A real aiohttp backend runs the middleware; the broker's JWKS is served by a real HTTPS server whose certificate
comes from the session's throwaway CA (tests.certfactory.make_pki). Every refusal row also asserts that the
handler was not called.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from broker.canonical import canonicalize
from broker.jose import Signer, generate_ec_jwk
from broker.sdk.backend import TXN, SeenTxns, TxnTokenMiddleware, public_jwks_from_file, txn_token_middleware
from broker.txn.tokens import TxnClaims, mint_txn_token
from tests.certfactory import Pki, client_ssl_context

ISSUER = "https://localhost:8443"
AUDIENCE = "example.org"
ACTOR = "spiffe://example.org/agents/expense-assistant"
ARGS: dict[str, Any] = {"invoice_id": "INV-8831", "amount": 4800, "department": "42"}
TOOLS = {"/approve": "approveExpense", "/invoices": "listInvoices"}

SIGNER = Signer.from_jwk(generate_ec_jwk())
ROTATED = Signer.from_jwk(generate_ec_jwk())  # published only later (key rotation)
UNPUBLISHED = Signer.from_jwk(generate_ec_jwk())
FOREIGN_WITH_OUR_KID = Signer(key=UNPUBLISHED.key, kid=SIGNER.kid, alg="ES256")


def mint(signer: Signer = SIGNER, **overrides: Any) -> str:
    params: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "subject": "alice",
        "scope": "tool:approveExpense",
        "actor_id": ACTOR,
        "tool": "approveExpense",
        "arguments": ARGS,
        "policy_version": "0123456789ab",
        "cnf_jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I",
        "req_ip": "127.0.0.1",
        "authn": "dpop",
        "now": time.time(),
    }
    params.update(overrides)
    return mint_txn_token(signer, **params).token


@dataclass
class JwksServer:
    """The broker's ``/.well-known/jwks.json`` on HTTPS; ``keys`` may change between requests (rotation)."""

    base: str = ""
    keys: list[dict[str, Any]] = field(default_factory=lambda: [SIGNER.public_jwk()])
    hits: int = 0

    @property
    def url(self) -> str:
        return self.base + "/.well-known/jwks.json"

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.json_response({"keys": self.keys})


@pytest.fixture
async def jwks_server(pki: Pki) -> AsyncIterator[JwksServer]:
    server = JwksServer()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", server.handle)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki.backend), str(pki.backend_key))  # SANs include IP 127.0.0.1
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    server.base = f"https://127.0.0.1:{runner.addresses[0][1]}"
    yield server
    await runner.cleanup()


@dataclass
class Backend:
    client: TestClient[web.Request, web.Application]
    verifier: TxnTokenMiddleware
    #: the claims each handler call saw at request[TXN] (None: none set)
    calls: list[TxnClaims | None]
    #: the precise reason of each refusal (the on_refusal hook)
    refusals: list[str]

    async def post(
        self, path: str = "/approve", body: Any = None, *, token: str | None = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        headers: CIMultiDict[str] = CIMultiDict()
        if token is not None:
            headers["Txn-Token"] = token
        return await self.send(path, body, headers=headers, raw=raw)

    async def send(
        self, path: str, body: Any, *, headers: CIMultiDict[str], raw: bytes | None = None
    ) -> tuple[int, Any]:
        data = raw if raw is not None else canonicalize(body if body is not None else ARGS)
        headers.setdefault("Content-Type", "application/json")
        async with self.client.post(path, data=data, headers=headers) as resp:
            return resp.status, await resp.json()


BackendFactory = Callable[..., Awaitable[Backend]]


@pytest.fixture
def backend_factory(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    jwks_server: JwksServer,
    pki: Pki,
) -> BackendFactory:
    async def factory(**options: Any) -> Backend:
        settings: dict[str, Any] = {
            "jwks_url": jwks_server.url,
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "ssl": client_ssl_context(pki),
            "injected": ("department",),
            "tools": TOOLS,
            **options,
        }
        refusals: list[str] = []
        verifier = txn_token_middleware(**settings, on_refusal=refusals.append)
        calls: list[TxnClaims | None] = []

        async def handle(request: web.Request) -> web.Response:
            claims = request.get(TXN)
            calls.append(claims)
            return web.json_response({"sub": claims.sub if claims else None, "body": await request.json()})

        app = web.Application(middlewares=[verifier])
        app.cleanup_ctx.append(verifier.cleanup_ctx)
        for path in TOOLS:
            app.router.add_post(path, handle)
        return Backend(await aiohttp_client(app), verifier, calls, refusals)

    return factory


async def test_valid_token_is_accepted_and_claims_reach_the_handler(
    backend_factory: BackendFactory, jwks_server: JwksServer
) -> None:
    backend = await backend_factory()
    token = mint()
    status, body = await backend.post(token=token, body=ARGS)
    assert status == 200 and body == {"sub": "alice", "body": ARGS}
    [claims] = backend.calls
    assert claims is not None and claims.tool == "approveExpense" and claims.actor_id == ACTOR
    assert claims.arguments == ARGS and claims.claims["tctx"]["arguments"] == ARGS
    assert jwks_server.hits == 1  # fetched once, at startup


def _two_headers() -> CIMultiDict[str]:
    token = mint()
    return CIMultiDict([("Txn-Token", token), ("Txn-Token", token)])


REFUSALS: list[Any] = [
    pytest.param({"token": None}, "txn_missing", id="missing-header"),
    pytest.param({"token": "not-a-jws"}, "txn_segments", id="malformed"),
    pytest.param({"token": lambda: mint(FOREIGN_WITH_OUR_KID)}, "txn_signature", id="bad-signature"),
    pytest.param({"token": lambda: mint(now=time.time() - 400)}, "txn_expired", id="expired"),
    pytest.param({"token": lambda: mint(audience="other.example")}, "txn_aud", id="other-trust-domain"),
    pytest.param(
        {"token": lambda: SIGNER.sign({"sub": "alice"}, typ="at+jwt")}, "txn_typ", id="access-token-typ-T15"
    ),
    pytest.param({"body": {**ARGS, "amount": 4900}}, "txn_body_mismatch", id="body-differs-from-token"),
    pytest.param({"body": {**ARGS, "amount": "4800"}}, "txn_body_mismatch", id="body-type-differs"),
    pytest.param({"body": {**ARGS, "vendor": "x"}}, "txn_body_mismatch", id="body-has-extra-key"),
    pytest.param(
        {"body": {"invoice_id": "INV-8831", "amount": 4800}}, "txn_body_mismatch", id="injected-key-missing"
    ),
    pytest.param({"raw": b"{not json"}, "txn_body_invalid", id="body-not-json"),
    pytest.param({"raw": b'{"amount":1,"amount":4800}'}, "txn_body_invalid", id="body-duplicate-member"),
    pytest.param({"path": "/invoices"}, "txn_tool", id="token-for-another-tool"),
]


@pytest.mark.parametrize(("row", "reason"), REFUSALS)
async def test_refusals(backend_factory: BackendFactory, row: dict[str, Any], reason: str) -> None:
    backend = await backend_factory()
    token = row.get("token", mint)
    status, body = await backend.post(
        row.get("path", "/approve"),
        row.get("body", ARGS),
        token=token() if callable(token) else token,
        raw=row.get("raw"),
    )
    assert status == 401
    assert body["error"] == "invalid_txn_token" and body["error_description"]
    assert backend.refusals == [reason]
    assert backend.calls == []


async def test_two_txn_token_headers_are_refused(backend_factory: BackendFactory) -> None:
    backend = await backend_factory()
    status, body = await backend.send("/approve", ARGS, headers=_two_headers())
    assert (status, body["error"], backend.calls, backend.refusals) == (
        401,
        "invalid_txn_token",
        [],
        ["txn_multiple"],
    )


@pytest.mark.parametrize(
    ("token_args", "body_args"),
    [
        ({"invoice_id": "INV-8831", "amount": 4800}, ARGS),  # agent sent no department; the broker set it
        (ARGS, {**ARGS, "department": "7"}),  # the broker overrode the agent's value
        (
            ARGS,
            {"department": "42", "amount": 4800.0, "invoice_id": "INV-8831"},
        ),  # same JCS value, other order
    ],
    ids=["injected-key-added", "injected-key-overridden", "same-canonical-value"],
)
async def test_without_tctx_injected_the_configured_keys_may_differ(
    backend_factory: BackendFactory, token_args: dict[str, Any], body_args: dict[str, Any]
) -> None:
    backend = await backend_factory()
    status, body = await backend.post(token=mint(arguments=token_args), body=body_args)
    assert status == 200 and body["body"] == body_args


AGENT_ARGS: dict[str, Any] = {"invoice_id": "INV-8831", "amount": 4800}
INJECTED: dict[str, Any] = {"department": "42"}


@pytest.mark.parametrize(
    ("token_args", "body_args"),
    [
        (AGENT_ARGS, {**AGENT_ARGS, "department": "42"}),  # agent sent no department; the broker set it
        ({**AGENT_ARGS, "department": "7"}, {**AGENT_ARGS, "department": "42"}),  # the broker overrode "7"
        (AGENT_ARGS, {"department": "42", "amount": 4800.0, "invoice_id": "INV-8831"}),  # same JCS value
    ],
    ids=["injected-key-added", "agents-value-overridden", "same-canonical-value"],
)
async def test_honest_injected_values_are_accepted(
    backend_factory: BackendFactory, token_args: dict[str, Any], body_args: dict[str, Any]
) -> None:
    backend = await backend_factory()
    status, body = await backend.post(token=mint(arguments=token_args, injected=INJECTED), body=body_args)
    assert status == 200 and body["body"] == body_args
    [claims] = backend.calls
    assert claims is not None and claims.injected == INJECTED and claims.arguments == token_args


@pytest.mark.parametrize(
    "body_args",
    [
        {**AGENT_ARGS, "department": "7"},
        {**AGENT_ARGS, "department": 42},
        AGENT_ARGS,
        {**AGENT_ARGS, "department": "42", "vendor": "x"},
        {"invoice_id": "INV-8831", "department": "42"},
        {**AGENT_ARGS, "department": "42", "amount": 4900},
    ],
    ids=[
        "forged-injected-value",
        "injected-value-type-changed",
        "injected-key-missing",
        "extra-key",
        "agents-key-missing",
        "agents-value-changed",
    ],
)
async def test_body_must_equal_the_forwarded_arguments_of_an_injected_token(
    backend_factory: BackendFactory, body_args: dict[str, Any]
) -> None:
    # The configured ``injected`` keys ("department") are no longer a blind spot once the token names the values.
    backend = await backend_factory()
    status, body = await backend.post(token=mint(arguments=AGENT_ARGS, injected=INJECTED), body=body_args)
    assert (status, body["error"]) == (401, "invalid_txn_token")
    assert backend.refusals == ["txn_body_mismatch"] and backend.calls == []


async def test_single_use_refuses_the_second_presentation(backend_factory: BackendFactory) -> None:
    backend = await backend_factory(single_use=True)
    token = mint()
    # A presentation refused for its body does not consume the token ...
    assert (await backend.post(token=token, body={**ARGS, "amount": 1}))[0] == 401
    assert (await backend.post(token=token))[0] == 200
    # ... the first accepted one does.
    status, body = await backend.post(token=token)
    assert (status, body["error"]) == (401, "invalid_txn_token")
    assert len(backend.calls) == 1 and backend.refusals == ["txn_body_mismatch", "txn_replayed"]
    assert (await backend.post(token=mint()))[0] == 200  # another txn is unaffected


async def test_without_single_use_a_token_may_be_presented_again(backend_factory: BackendFactory) -> None:
    backend = await backend_factory()
    token = mint()
    assert [(await backend.post(token=token))[0] for _ in range(2)] == [200, 200]


async def test_unknown_kid_triggers_one_jwks_refetch(
    backend_factory: BackendFactory, jwks_server: JwksServer
) -> None:
    backend = await backend_factory()
    assert jwks_server.hits == 1
    jwks_server.keys.append(ROTATED.public_jwk())  # the broker rotated: new key published
    assert (await backend.post(token=mint(ROTATED)))[0] == 200
    assert jwks_server.hits == 2
    # Another unknown kid within the 30 s cooldown: refused without a fetch (J06, no amplification).
    assert (await backend.post(token=mint(UNPUBLISHED)))[0] == 401
    assert jwks_server.hits == 2 and backend.refusals == ["txn_unknown_kid"]
    assert (await backend.post(token=mint(SIGNER)))[0] == 200  # known kids never fetch
    assert jwks_server.hits == 2
    assert backend.verifier.keys.fetch_count == 2


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(lambda server: {"ssl": None}, id="jwks-server-cert-not-trusted"),
        pytest.param(lambda server: {"jwks_url": server.base + "/missing.json"}, id="jwks-url-404"),
    ],
)
async def test_no_keys_fails_closed(
    backend_factory: BackendFactory,
    jwks_server: JwksServer,
    options: Callable[[JwksServer], dict[str, Any]],
) -> None:
    backend = await backend_factory(**options(jwks_server))
    status, body = await backend.post(token=mint())
    assert (status, body["error"], backend.calls) == (401, "invalid_txn_token", [])
    assert backend.refusals == ["txn_unknown_kid"] and backend.verifier.keys.loaded is False


async def test_static_jwks_and_optional_header(
    backend_factory: BackendFactory, jwks_server: JwksServer
) -> None:
    backend = await backend_factory(jwks_url=None, jwks={"keys": [SIGNER.public_jwk()]}, required=False)
    assert (await backend.post())[0] == 200  # no header: the handler runs without claims
    assert (await backend.post(token=mint()))[0] == 200
    assert (await backend.post(token=mint(UNPUBLISHED)))[0] == 401  # a header present is always verified
    assert [c.sub if c else None for c in backend.calls] == [None, "alice"]
    assert jwks_server.hits == 0


def test_key_source_is_exactly_one() -> None:
    with pytest.raises(ValueError):
        txn_token_middleware(issuer=ISSUER, audience=AUDIENCE)
    with pytest.raises(ValueError):
        txn_token_middleware(jwks_url="http://127.0.0.1/jwks.json", issuer=ISSUER, audience=AUDIENCE)


def test_seen_txns_forgets_only_expired_ids_and_fails_closed_when_full() -> None:
    seen = SeenTxns(max_entries=2)
    assert seen.claim("a", forget_after=100, now=0) and not seen.claim("a", forget_after=100, now=99)
    assert seen.claim("b", forget_after=50, now=0)
    with pytest.raises(OverflowError):  # full of live ids: refuse rather than forget one (replay)
        seen.claim("c", forget_after=100, now=10)
    assert seen.claim("c", forget_after=200, now=60)  # "b" expired and was swept
    assert (
        seen.claim("a", forget_after=300, now=100) and len(seen) == 2
    )  # "a" expired: a new token may reuse it


# --- public_jwks_from_file -------------------------------------------------------------------------------------

PRIVATE_JWK = generate_ec_jwk()  # what `broker certs` writes to broker-signing.jwk: kid = thumbprint, alg
PRIVATE_PUBLIC = Signer.from_jwk(PRIVATE_JWK).public_jwk()
BARE_PUBLIC = {k: PRIVATE_PUBLIC[k] for k in ("kty", "crv", "x", "y")}


@pytest.mark.parametrize(
    ("document", "keys"),
    [
        (PRIVATE_JWK, [{k: v for k, v in PRIVATE_PUBLIC.items() if k != "use"}]),
        (
            {k: v for k, v in PRIVATE_JWK.items() if k not in ("kid", "alg")},
            [{**BARE_PUBLIC, "kid": PRIVATE_PUBLIC["kid"]}],
        ),
        (PRIVATE_PUBLIC, [PRIVATE_PUBLIC]),
        ({"keys": [PRIVATE_PUBLIC, SIGNER.public_jwk()]}, [PRIVATE_PUBLIC, SIGNER.public_jwk()]),
        ({"keys": [PRIVATE_JWK]}, [{k: v for k, v in PRIVATE_PUBLIC.items() if k != "use"}]),
    ],
    ids=[
        "private-jwk",
        "private-jwk-without-kid-gets-thumbprint",
        "public-jwk",
        "public-jwks",
        "jwks-with-private",
    ],
)
def test_public_jwks_from_file_keeps_only_public_members(
    tmp_path: Path, document: dict[str, Any], keys: list[dict[str, Any]]
) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    assert public_jwks_from_file(path) == {"keys": keys}


@pytest.mark.parametrize(
    "content",
    [None, b"{not json", b'{"keys": {"kty": "EC"}}', json.dumps({"kty": "oct", "k": "c2VjcmV0"}).encode()],
    ids=["missing-file", "not-json", "keys-not-an-array", "private-oct-key"],
)
def test_public_jwks_from_file_refuses(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "keys.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError) as caught:
        public_jwks_from_file(path)
    assert str(path) in str(caught.value)  # the operator learns which file


async def test_a_private_jwk_file_verifies_its_own_tokens(
    backend_factory: BackendFactory, tmp_path: Path
) -> None:
    path = tmp_path / "broker-signing.jwk"
    path.write_text(json.dumps(PRIVATE_JWK))
    backend = await backend_factory(jwks_url=None, jwks=public_jwks_from_file(path))
    assert (await backend.post(token=mint(Signer.from_jwk(PRIVATE_JWK))))[0] == 200
    assert (await backend.post(token=mint()))[0] == 401  # SIGNER's key is not in that file
