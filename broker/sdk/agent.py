"""The agent side of the broker's API: DPoP proofs (RFC 9449 §4) and a small async client.

:class:`DpopSigner` makes proofs fast enough to sign one per request in a load generator: the header segment
(``typ``, ``alg``, public ``jwk``) is encoded once, and only the claims are serialised and signed per proof.

:class:`AgentClient` is what an agent (or an approver, or a test) uses to call the broker over one
``aiohttp.ClientSession``: every request carries ``Authorization: DPoP <token>`` and a fresh proof for the
exact URL (RFC 9449 §7.1), includes the latest server nonce, and is retried once when the server answers
``401`` with ``error="use_dpop_nonce"`` (RFC 9449 §8.2/§9). The token is a fixed value or comes from a
:class:`broker.sdk.credentials.TokenSource` (a rotating file, a credential-helper command), asked before every
request. Convenience methods follow CONTRACT §3 and §5. ``broker connect`` (:mod:`broker.sdk.connect`) signs
and retries with the same code.
"""

from __future__ import annotations

import hashlib
import json as jsonlib
import os
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
from multidict import CIMultiDictProxy

from broker.dev.idp import DEFAULT_TRUST_DOMAIN, read_jwk, trust_domain_of
from broker.jose import (
    JoseError,
    b64url_encode,
    compact_json,
    default_alg,
    jwk_thumbprint,
    private_key_from_jwk,
    public_jwk,
    raw_signature,
)
from broker.sdk.credentials import TokenSource

__all__ = ["AgentClient", "ClientReply", "DpopSigner", "challenge_error", "htu_of", "nonce_challenge"]

# RFC 8693 §2.1 / §3 and draft-ietf-oauth-transaction-tokens identifiers (CONTRACT §5).
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TXN_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:txn_token"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
#: RFC 9449 §4.2: the jti needs "sufficient entropy"; 16 random bytes is 128 bits.
_JTI_BYTES = 16


def htu_of(url: str) -> str:
    """RFC 9449 §4.2: ``htu`` is the request URL "without query and fragment parts"."""
    return url.split("#", 1)[0].split("?", 1)[0]


@lru_cache(maxsize=512)
def _target_members(method: str, url: str) -> str:
    """The ``"htm":…,"htu":…`` members of a proof's claims for one request target, JSON-escaped (ASCII)."""
    return f'"htm":{jsonlib.dumps(method)},"htu":{jsonlib.dumps(htu_of(url))}'


class DpopSigner:
    """Signs DPoP proofs with one private key (EC P-256/P-384/P-521 or Ed25519; RSA works too, slowly).

    ``jwk`` is a private JWK as ``broker certs`` writes it; its ``alg`` is used when present (it must fit the
    key), else the key's default (ES256, ES384, ES512, EdDSA). Raises :class:`ValueError` for a public or
    unusable key.
    """

    __slots__ = ("_header_segment", "_key", "_last_ath", "alg", "jkt", "public_jwk")

    def __init__(self, jwk: Mapping[str, Any]) -> None:
        if not isinstance(jwk, Mapping) or "d" not in jwk:
            raise ValueError("a DPoP signer needs a private JWK")
        try:
            key = private_key_from_jwk(jwk)
        except (JoseError, TypeError) as exc:
            raise ValueError(f"DPoP key is not usable: {exc}") from exc
        alg = str(jwk.get("alg") or default_alg(key))
        try:
            raw_signature(key, alg, b"")  # fail here, not on the first request, when alg does not fit
        except JoseError as exc:
            raise ValueError(f"DPoP key is not usable: {exc}") from exc
        #: the public members only (RFC 9449 §4.2: the header's jwk "MUST NOT contain a private key")
        self.public_jwk: dict[str, str] = public_jwk(key)
        #: RFC 7638 thumbprint: the ``cnf.jkt`` a token bound to this key carries (RFC 9449 §6.1)
        self.jkt: str = jwk_thumbprint(self.public_jwk)
        self.alg = alg
        self._key = key
        header = {"typ": "dpop+jwt", "alg": alg, "jwk": self.public_jwk}
        self._header_segment = b64url_encode(compact_json(header)) + "."
        self._last_ath: tuple[str, str] = ("", "")

    def _ath(self, access_token: str) -> str:
        # An agent presents the same token on every call: hash it once (RFC 9449 §4.2 ath).
        token, ath = self._last_ath
        if token != access_token:
            ath = b64url_encode(hashlib.sha256(access_token.encode("ascii")).digest())
            self._last_ath = (access_token, ath)
        return ath

    def proof(
        self,
        method: str,
        url: str,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
        now: float | None = None,
    ) -> str:
        """A compact DPoP proof (RFC 9449 §4.2) for ``method`` and ``url`` (its query and fragment dropped).

        ``access_token`` adds ``ath``; ``nonce`` adds the server's ``nonce``; ``now`` (epoch seconds, default
        the clock) gives ``iat``. Every call has a fresh random ``jti``.
        """
        # Built as text rather than through json.dumps on a dict: jti and ath are base64url and iat an int,
        # so only htm/htu (cached per target) and the nonce need JSON string escaping. Saves ~3 µs a proof.
        iat = int(time.time() if now is None else now)
        payload = (
            f'{{"jti":"{b64url_encode(os.urandom(_JTI_BYTES))}",{_target_members(method, url)},"iat":{iat}'
        )
        if access_token is not None:
            payload += f',"ath":"{self._ath(access_token)}"'
        if nonce is not None:
            payload += ',"nonce":' + jsonlib.dumps(nonce)
        signing_input = self._header_segment + b64url_encode((payload + "}").encode("ascii"))
        signature = raw_signature(self._key, self.alg, signing_input.encode("ascii"))
        return signing_input + "." + b64url_encode(signature)


# RFC 9110 §11.2 auth-param = token BWS "=" BWS ( token / quoted-string )
_AUTH_PARAM = re.compile(r'([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))')


def challenge_error(www_authenticate: list[str]) -> str | None:
    """The ``error`` auth-param of the ``WWW-Authenticate`` values (RFC 6750 §3, RFC 9449 §7.1), if any.

    A protocol field, parsed as one: quoted-string escapes are undone, token form is accepted.
    """
    for value in www_authenticate:
        for match in _AUTH_PARAM.finditer(value):
            if match.group(1).lower() == "error":
                quoted = match.group(2)
                return re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else match.group(3)
    return None


def nonce_challenge(status: int, nonce: str | None, www_authenticate: list[str]) -> bool:
    """Whether an answer is RFC 9449 §8.2's ``use_dpop_nonce`` challenge: retry once with ``nonce``."""
    return status == 401 and bool(nonce) and challenge_error(www_authenticate) == "use_dpop_nonce"


@dataclass(frozen=True)
class ClientReply:
    """One HTTP answer, read completely."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON (ValueError when it is not)."""
        return jsonlib.loads(self.body)

    @property
    def error(self) -> str | None:
        """The error code: the JSON body's ``error``, else the ``WWW-Authenticate`` ``error`` parameter."""
        try:
            body = self.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return str(body["error"])
        return challenge_error(self.headers.getall("WWW-Authenticate", []))


class AgentClient:
    """An async client for the broker's agent-facing API (CONTRACT §3), used as ``async with``.

    ``cert``/``key``: the client certificate (an agent's X.509-SVID), or None (an approver). ``dpop_jwk``:
    the private DPoP key; without one no ``DPoP`` header is sent. ``access_token``: sent as
    ``Authorization: <scheme> <token>``; ``scheme`` is ``DPoP`` (or ``Bearer`` for ``mtls`` mode, or to test
    that a DPoP-bound token is refused under it). ``token_source``, instead of ``access_token``, is asked for
    the token before every request (a rotating file, a command). ``ca`` is the trust bundle for the broker's
    certificate; plain ``http://`` base URLs (unit tests) use no TLS. ``trust_domain`` is the ``audience`` of
    exchanges.
    """

    def __init__(
        self,
        base_url: str,
        *,
        ca: Path,
        cert: Path | None,
        key: Path | None,
        dpop_jwk: Mapping[str, Any] | None,
        access_token: str | None,
        scheme: str = "DPoP",
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        timeout: float = 30.0,
        token_source: TokenSource | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.access_token = access_token
        self.token_source = token_source
        self.scheme = scheme
        self.trust_domain = trust_domain
        self.signer = DpopSigner(dpop_jwk) if dpop_jwk is not None else None
        #: the latest ``DPoP-Nonce`` the server sent (RFC 9449 §8.2: use the most recent one)
        self.nonce: str | None = None
        self._ssl: ssl.SSLContext | None = None
        if self.base_url.startswith("https://"):
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if cert is not None:
                context.load_cert_chain(str(cert), str(key) if key is not None else None)
            self._ssl = context
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_certs(
        cls,
        base_url: str,
        certs_dir: Path,
        *,
        agent: str | None = None,
        human: str | None = None,
        access_token: str | None = None,
        scheme: str = "DPoP",
        token_source: TokenSource | None = None,
    ) -> AgentClient:
        """A client from the CONTRACT §10 folder: exactly one of ``agent`` (its SVID and DPoP key) or
        ``human`` (``humans/NAME-dpop.jwk``, no client certificate). The exchange audience is the trust
        domain of ``ca.pem``. Raises :class:`ValueError` for a missing or unusable file."""
        if (agent is None) == (human is None):
            raise ValueError("give exactly one of agent or human")
        certs_dir = Path(certs_dir)
        ca = certs_dir / "ca.pem"
        trust_domain = trust_domain_of(ca) or DEFAULT_TRUST_DOMAIN
        cert: Path | None
        key: Path | None
        if agent is not None:
            folder = certs_dir / "agents"
            cert, key = folder / f"{agent}.pem", folder / f"{agent}-key.pem"
            dpop = read_jwk(folder / f"{agent}-dpop.jwk")
        else:
            cert, key = None, None
            dpop = read_jwk(certs_dir / "humans" / f"{human}-dpop.jwk")
        return cls(
            base_url,
            ca=ca,
            cert=cert,
            key=key,
            dpop_jwk=dpop,
            access_token=access_token,
            scheme=scheme,
            trust_domain=trust_domain,
            token_source=token_source,
        )

    async def __aenter__(self) -> AgentClient:
        connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url_for(self, path: str) -> str:
        """The absolute URL of ``path`` (which starts with ``/``) under the base URL."""
        if not path.startswith("/"):
            raise ValueError("path must start with '/'")
        return self.base_url + path

    def proof_for(self, method: str, path: str, *, nonce: str | None = None) -> str:
        """A fresh proof for ``method path`` bound to this client's token (the one ``request`` would send).

        Pass it back in ``headers={"DPoP": ...}`` to send a proof of your choosing (e.g. the same one twice).
        """
        if self.signer is None:
            raise ValueError("this client has no DPoP key")
        return self.signer.proof(
            method,
            self.url_for(path),
            access_token=self.access_token,
            nonce=nonce if nonce is not None else self.nonce,
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> ClientReply:
        """Send ``method path`` with the token and a fresh proof; retry once on ``use_dpop_nonce``.

        ``headers`` are sent as given and win over the generated ``Authorization``/``DPoP``; when they carry
        a ``DPoP`` header the proof is the caller's, and the request is never retried. ``json``/``data`` must
        be re-sendable (a value, bytes, str or a form mapping; not a stream). A failing ``token_source`` raises
        :class:`broker.sdk.credentials.TokenUnavailable`.
        """
        if self._session is None:
            raise RuntimeError("use AgentClient as 'async with AgentClient(...) as client'")
        if self.token_source is not None:
            self.access_token = await self.token_source.token()
        method = method.upper()
        url = self.url_for(path)
        caller_headers = dict(headers or {})
        own_proof = self.signer is not None and not any(k.lower() == "dpop" for k in caller_headers)
        attempts = 2 if own_proof else 1
        for attempt in range(attempts):
            sent: dict[str, str] = {}
            if self.access_token is not None:
                sent["Authorization"] = f"{self.scheme} {self.access_token}"
            if own_proof:
                sent["DPoP"] = self.proof_for(method, path)
            sent = _merge_headers(sent, caller_headers)
            async with self._session.request(
                method, url, json=json, data=data, headers=sent, allow_redirects=False
            ) as response:
                reply = ClientReply(response.status, response.headers, await response.read())
            fresh_nonce = reply.headers.get("DPoP-Nonce")
            if fresh_nonce:
                self.nonce = fresh_nonce
            retry = attempt + 1 < attempts and nonce_challenge(
                reply.status, fresh_nonce, reply.headers.getall("WWW-Authenticate", [])
            )
            if not retry:
                break
        return reply

    # --- CONTRACT §3 / §5 conveniences -----------------------------------------------------------------

    async def list_tools(self) -> ClientReply:
        """``GET /v1/tools``: discovery."""
        return await self.request("GET", "/v1/tools")

    async def call_tool(
        self, name: str, arguments: Mapping[str, Any], *, txn_token: str | None = None
    ) -> ClientReply:
        """``POST /v1/tools/{name}`` with the arguments as JSON, and ``Txn-Token`` when given."""
        headers = {"Txn-Token": txn_token} if txn_token is not None else None
        return await self.request(
            "POST", f"/v1/tools/{_segment(name)}", json=dict(arguments), headers=headers
        )

    def exchange_form(
        self, tool: str, arguments: Mapping[str, Any], *, approval_id: str | None = None
    ) -> dict[str, str]:
        """The RFC 8693 form of a txn-token exchange (CONTRACT §5) for ``tool`` with ``arguments``."""
        if self.access_token is None:
            raise ValueError("an exchange needs an access token (the subject_token)")
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "requested_token_type": TXN_TOKEN_TYPE,
            "audience": self.trust_domain,
            "subject_token": self.access_token,
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "scope": f"tool:{tool}",
            "request_details": jsonlib.dumps(
                {"tool": tool, "arguments": dict(arguments)}, separators=(",", ":"), ensure_ascii=False
            ),
        }
        if approval_id is not None:
            form["approval_id"] = approval_id
        return form

    async def exchange(
        self, tool: str, arguments: Mapping[str, Any], *, approval_id: str | None = None
    ) -> ClientReply:
        """``POST /v1/token``: exchange the access token for a txn token bound to ``tool`` and ``arguments``."""
        if self.token_source is not None:  # the form carries the token as subject_token: the current one
            self.access_token = await self.token_source.token()
        return await self.request(
            "POST", "/v1/token", data=self.exchange_form(tool, arguments, approval_id=approval_id)
        )

    async def approval(self, approval_id: str) -> ClientReply:
        """``GET /v1/approvals/{id}``: the approval's status."""
        return await self.request("GET", f"/v1/approvals/{_segment(approval_id)}")

    async def decide(self, approval_id: str, decision: str) -> ClientReply:
        """``POST /v1/approvals/{id}`` ``{"decision": "approve"|"deny"}`` (an approver's own token)."""
        return await self.request(
            "POST", f"/v1/approvals/{_segment(approval_id)}", json={"decision": decision}
        )


def _segment(value: str) -> str:
    # One path segment: a '/' or '?' in a tool name or approval id must not change the route or the htu.
    return quote(value, safe="")


def _merge_headers(generated: dict[str, str], caller: Mapping[str, str]) -> dict[str, str]:
    # HTTP field names are case-insensitive: a caller's "dpop" replaces our "DPoP" instead of adding a second.
    overridden = {name.lower() for name in caller}
    merged = {name: value for name, value in generated.items() if name.lower() not in overridden}
    merged.update(caller)
    return merged
