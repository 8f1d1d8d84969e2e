"""Shared fixtures: a per-session development PKI, a recording upstream on real TLS, a broker on real sockets."""

from __future__ import annotations

import asyncio
import io
import json
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
import structlog
import yaml
from aiohttp import web
from multidict import CIMultiDict

from broker.config.loader import load_config
from broker.identity.dpop import ath_for
from broker.jose import jwk_thumbprint
from broker.resources import NOISE, RUNTIME
from broker.server import RunningBroker, start
from tests.certfactory import Pki, client_ssl_context, make_pki
from tests.dpopfactory import make_proof
from tests.tokenfactory import OMIT, make_token

# In-process brokers log as `broker run` does: to stderr (one access line per request), never into the stdout
# that a command-line test reads.
structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Recorded:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes
    peer_cert: bytes | None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class RecordingUpstream:
    """A tool backend on HTTPS that requires a client certificate and records what reached it.

    ``respond`` decides the answer per request; the default echoes the arguments back as JSON.
    """

    url: str = ""
    received: list[Recorded] = field(default_factory=list)
    respond: Callable[[Recorded], Awaitable[web.StreamResponse]] | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        record = Recorded(
            method=request.method,
            path=request.path,
            headers=CIMultiDict(request.headers),
            body=await request.read(),
            peer_cert=ssl_object.getpeercert(binary_form=True) if ssl_object else None,
        )
        self.received.append(record)
        if self.respond is not None:
            return await self.respond(record)
        return web.json_response({"echo": record.json() if record.body else None})


def backend_ssl_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.backend), str(pki.backend_key))
    ctx.load_verify_locations(cafile=str(pki.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@asynccontextmanager
async def recording_upstream(pki: Pki) -> AsyncIterator[RecordingUpstream]:
    """A :class:`RecordingUpstream` serving HTTPS on 127.0.0.1 (an ephemeral port) for the block."""
    recorder = RecordingUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=backend_ssl_context(pki))
    await site.start()
    recorder.url = f"https://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield recorder
    finally:
        await runner.cleanup()


@pytest.fixture
async def upstream(pki: Pki) -> AsyncIterator[RecordingUpstream]:
    async with recording_upstream(pki) as recorder:
        yield recorder


def base_config(pki: Pki, tmp: Path, *, upstream_url: str, **overrides: Any) -> dict[str, Any]:
    """A complete config dict on ephemeral ports; ``overrides`` replace whole top-level sections."""
    config: dict[str, Any] = {
        "version": 1,
        "server": {
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "public_url": "https://localhost:8443",
            "tls": {
                "cert": str(pki.broker),
                "key": str(pki.broker_key),
                "client_ca": str(pki.ca),
                "client_cert": "optional",
            },
            "shutdown_grace_seconds": 5,
        },
        "identity": {
            "trust_domain": pki.trust_domain,
            "audience": "https://broker.example.org",
            "issuers": [{"issuer": "https://idp.example.org", "jwks_file": str(pki.idp_jwks)}],
        },
        "signing": {"key_file": str(pki.signing_jwk)},
        "audit": {"file": str(tmp / "audit.jsonl"), "checkpoint_every": 5},
        "tools": [
            {
                "name": "approveExpense",
                "description": "Approve an invoice.",
                "input_schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["invoice_id", "amount"],
                    "properties": {
                        "invoice_id": {"type": "string"},
                        "amount": {"type": "number"},
                        "department": {"type": "string"},
                    },
                },
                "upstream": {"url": f"{upstream_url}/approve", "timeout_seconds": 2},
                "audit_fields": ["invoice_id"],
            },
        ],
        "policies": [{"id": "any-agent", "tools": ["*"], "effect": "allow", "when": 'actor.id != ""'}],
    }
    config.update(overrides)
    return config


@dataclass
class BrokerUnderTest:
    running: RunningBroker
    pki: Pki
    config_path: Path
    audit_path: Path

    @property
    def url(self) -> str:
        _, port = self.running.main_address
        return f"https://127.0.0.1:{port}"

    @property
    def public_url(self) -> str:
        return self.running.app[RUNTIME].current.config.server.public_url

    @property
    def admin_url(self) -> str:
        _, port = self.running.admin_address
        return f"http://127.0.0.1:{port}"

    def session(
        self, agent: str | None = "expense-assistant", *, cert: Path | None = None, key: Path | None = None
    ) -> aiohttp.ClientSession:
        """An HTTPS client presenting ``agent``'s SVID (or the given cert/key, or none with agent=None)."""
        if cert is None and agent is not None:
            files = self.pki.agent(agent)
            cert, key = files.cert, files.key
        ctx = client_ssl_context(self.pki, cert, key)
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, force_close=True))

    def audit_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]

    async def flush_noise(self) -> None:
        """Write the open ``summary`` windows of unauthenticated refusals now (as shutdown does), so that a test
        can read them (CONTRACT §15: they are not written one record per refusal)."""
        await self.running.app[NOISE].flush()

    def caller(
        self,
        sub: str = "alice",
        *,
        agent: str | None = "expense-assistant",
        cert: Path | None = None,
        key: Path | None = None,
        claims: dict[str, Any] | None = None,
        dpop_jwk: dict[str, Any] | None = None,
    ) -> Caller:
        """A human ``sub`` acting through ``agent`` (its SVID and DPoP key), with a token from the dev IdP.

        ``claims`` override the token's claims (``OMIT`` removes one); ``agent=None`` is a human acting directly
        (no client certificate, no ``act``), who needs ``dpop_jwk``.
        """
        if agent is not None:
            files = self.pki.agent(agent)
            cert, key = cert or files.cert, key or files.key
            dpop_jwk = dpop_jwk or json.loads(files.dpop_jwk.read_text())
        assert dpop_jwk is not None
        now = int(time.time())
        base: dict[str, Any] = {"cnf": {"jkt": jwk_thumbprint(dpop_jwk)}, "sub": sub}
        if agent is not None:
            base.update(act={"sub": self.pki.agent_id(agent)}, client_id=self.pki.agent_id(agent))
        else:
            base.update(act=OMIT, client_id=OMIT)
        idp = json.loads(self.pki.idp_jwk.read_text())
        token = make_token(idp, claims={**base, **(claims or {})}, now=now)
        return Caller(self, token=token, dpop_jwk=dpop_jwk, cert=cert, key=key)


@dataclass
class Reply:
    status: int
    body: Any
    headers: CIMultiDict[str]

    @property
    def error(self) -> str | None:
        return self.body.get("error") if isinstance(self.body, dict) else None


@dataclass
class Caller:
    """Makes real requests as one principal: mTLS with its certificate, a fresh DPoP proof per request."""

    broker: BrokerUnderTest
    token: str
    dpop_jwk: dict[str, Any]
    cert: Path | None
    key: Path | None

    def proof(self, method: str, path: str, **overrides: Any) -> str:
        htu = self.broker.public_url + path.split("?")[0]
        return make_proof(
            self.dpop_jwk, htm=method, htu=htu, iat=int(time.time()), ath=ath_for(self.token), **overrides
        )

    def auth_headers(self, method: str, path: str) -> dict[str, str]:
        return {"Authorization": f"DPoP {self.token}", "DPoP": self.proof(method, path)}

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        auth: dict[str, str] | None = None,
    ) -> Reply:
        """``auth`` replaces the Authorization/DPoP headers (None: a valid pair is made)."""
        hdrs = {**(self.auth_headers(method, path) if auth is None else auth)}
        data: Any = None
        if raw is not None or body is not None:
            hdrs["Content-Type"] = "application/json"
            data = io.BytesIO(raw) if raw is not None else json.dumps(body).encode()
        hdrs.update(headers or {})
        async with (
            self.broker.session(agent=None, cert=self.cert, key=self.key) as session,
            session.request(method, self.broker.url + path, data=data, headers=hdrs) as resp,
        ):
            payload = await resp.read()
            try:
                parsed = json.loads(payload) if payload else None
            except ValueError:
                parsed = payload
            return Reply(resp.status, parsed, CIMultiDict(resp.headers))

    async def exchange(
        self, tool: str, arguments: dict[str, Any], *, approval_id: str | None = None
    ) -> Reply:
        """``POST /v1/token`` (RFC 8693 form) for a txn token bound to ``tool`` and ``arguments``."""
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "requested_token_type": "urn:ietf:params:oauth:token-type:txn_token",
            "audience": self.broker.pki.trust_domain,
            "subject_token": self.token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "scope": f"tool:{tool}",
            "request_details": json.dumps({"tool": tool, "arguments": arguments}),
            **({"approval_id": approval_id} if approval_id else {}),
        }
        raw = urlencode(form).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        async with (
            self.broker.session(agent=None, cert=self.cert, key=self.key) as session,
            session.post(
                self.broker.url + "/v1/token",
                data=raw,
                headers={**headers, **self.auth_headers("POST", "/v1/token")},
            ) as resp,
        ):
            return Reply(resp.status, await resp.json(content_type=None), CIMultiDict(resp.headers))


BrokerFactory = Callable[..., Awaitable[BrokerUnderTest]]


@pytest.fixture
async def broker_factory(pki: Pki, tmp_path: Path) -> AsyncIterator[BrokerFactory]:
    started: list[RunningBroker] = []

    async def factory(config: dict[str, Any]) -> BrokerUnderTest:
        path = tmp_path / f"broker-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        running = await start(load_config(path))
        started.append(running)
        return BrokerUnderTest(running, pki, path, Path(config["audit"]["file"]))

    yield factory
    for running in started:
        await running.stop()
    await asyncio.sleep(0)


@pytest.fixture
async def broker(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> BrokerUnderTest:
    return await broker_factory(base_config(pki, tmp_path, upstream_url=upstream.url))
