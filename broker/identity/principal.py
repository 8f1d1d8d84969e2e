"""Stage 1, identity: the peer's SVID, the human's access token and its proof of possession → a Principal.

The order is HOSTILE §3.4, with the reason for each constraint:

    svid          first: an anonymous peer learns nothing, not even how its token would have fared
    headers       scheme and header cardinality before any parsing (D01, D02, D18, D19)
    proof         DPoP proof before the token: cheap structural checks and one signature, and ``ath`` needs
                  only the token's bytes, not its verification
    token         issuer keys, claims (cached by token hash until exp)
    binding       ``cnf.jkt`` = the proof's key (D15), ``cnf.x5t#S256`` = this connection's cert (M15, D21);
                  a DPoP-bound token sent as Bearer is refused (D16)
    actor         the token's ``act.sub`` (or ``client_id``) = the SVID's SPIFFE ID (dual identity)
    intent        the token's RFC 9396 ``authorization_details`` read into bounds (broker.policy.intent) — only
                  now that the token is authentic and this caller's; unreadable is invalid_token, never "unbounded"
    replay        not here: the proof's jti is claimed by the request's final guard (broker.gateway.guard),
                  together with its revocation check and txn-token single use in one atomic store step, after
                  every other check — so a refused request never burns a jti or a txn token (S07), and a store
                  failure refuses (S01)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import aiohttp

from broker.config.models import Identity
from broker.errors import BrokerError, InvalidRequest, InvalidToken
from broker.identity.dpop import (
    DpopPolicy,
    VerifiedProof,
    check_binding,
    parse_authorization,
    single_dpop_header,
    verify_proof,
)
from broker.identity.htu import expected_htu
from broker.identity.issuer_keys import IssuerKeys
from broker.identity.nonce import NonceService
from broker.identity.peer import RequestView, peer_actor
from broker.identity.spiffe import SpiffeId
from broker.identity.tokens import AccessToken, AccessTokenVerifier, IssuerPolicy
from broker.policy.intent import Intent, IntentError, parse_token_details

# Agents call the same few paths over and over; normalising them is pure, so remember the last few thousand
# (bounded: the path is the client's; failures raise and are never cached).
_expected_htu = lru_cache(maxsize=4096)(expected_htu)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the human subject (with the token's claims) and the agent acting for them."""

    subject: str
    claims: Mapping[str, Any]
    actor: SpiffeId | None
    token: AccessToken
    #: RFC 7638 thumbprint of the DPoP key this request was signed with (None with mTLS-bound tokens)
    jkt: str | None
    #: the proof's replay-cache entry (store key, ttl), claimed by the final guard
    replay: tuple[str, float] | None = None
    #: the token's RFC 9396 ``tool_invocation`` bounds (CONTRACT §17); None: the token carries none
    intent: Intent | None = None

    @property
    def actor_id(self) -> str | None:
        return str(self.actor) if self.actor is not None else None

    def revocation_kinds(self) -> dict[str, str]:
        """What an operator may revoke about this caller (CONTRACT §9), checked on every request."""
        kinds = {"sub": self.subject}
        if self.actor is not None:
            kinds["act"] = str(self.actor)
        if self.token.jti:
            kinds["jti"] = self.token.jti
        return kinds


def cert_thumbprint(der: bytes) -> str:
    """RFC 8705 §3.1 ``x5t#S256``: base64url(SHA-256(DER)) without padding."""
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


class Authenticator:
    """The identity stage for one loaded config. Built at load time; ``authenticate`` runs per request."""

    def __init__(self, identity: Identity, *, public_url: str, max_token_bytes: int) -> None:
        self.trust_domain = identity.trust_domain
        self.mode = identity.proof
        self.public_url = public_url
        self.max_token_bytes = max_token_bytes
        dpop = identity.dpop
        self.dpop_policy = DpopPolicy(
            algorithms=tuple(dpop.algorithms),
            iat_window=dpop.iat_window_seconds,
            iat_skew=dpop.iat_skew_seconds,
            require_nonce=dpop.require_nonce,
        )
        secret = dpop.nonce_secret.encode() if dpop.nonce_secret else secrets.token_bytes(32)
        self.nonces = NonceService(secret, lifetime=dpop.nonce_lifetime_seconds)
        self.issuer_keys: list[IssuerKeys] = []
        issuers: list[tuple[IssuerPolicy, IssuerKeys]] = []
        for issuer in identity.issuers:
            keys = IssuerKeys(
                issuer.issuer,
                jwks_file=issuer.jwks_file,
                jwks_url=issuer.jwks_url,
                discovery=issuer.jwks_file is None and issuer.jwks_url is None,
                ssl=ssl.create_default_context(cafile=str(issuer.ca)) if issuer.ca else None,
            )
            self.issuer_keys.append(keys)
            policy = IssuerPolicy(
                issuer=issuer.issuer,
                algorithms=tuple(issuer.algorithms),
                audience=identity.audience,
                max_lifetime=issuer.max_lifetime_seconds,
                leeway=identity.leeway_seconds,
                accepted_typ=tuple(issuer.accepted_typ),
            )
            issuers.append((policy, keys))
        self.tokens = AccessTokenVerifier(issuers, max_token_bytes=max_token_bytes)
        self.issuers = tuple(i.issuer for i in identity.issuers)

    async def start(self, *, now: float, session: aiohttp.ClientSession) -> None:
        """Fetch remote issuers' keys (jwks_url, discovery) once before serving; file keys are already loaded."""
        for keys in self.issuer_keys:
            await keys.start(now=now, session=session)

    async def close(self) -> None:
        for keys in self.issuer_keys:
            await keys.close()

    def protected_resource_metadata(self) -> dict[str, Any]:
        """RFC 9728 §2: what a client needs to know to call us."""
        return {
            "resource": self.public_url,
            "authorization_servers": list(self.issuers),
            "bearer_methods_supported": ["header"],
            "dpop_bound_access_tokens_required": self.mode == "dpop",
            "dpop_signing_alg_values_supported": list(self.dpop_policy.algorithms),
            "tls_client_certificate_bound_access_tokens": self.mode in ("mtls", "either"),
        }

    async def authenticate(
        self, request: RequestView, *, now: float, require_actor: bool = True
    ) -> Principal:
        """Every identity check of one request, or the BrokerError of the first that fails."""
        der = request.peer_der
        actor = peer_actor(der, self.trust_domain) if require_actor or der is not None else None

        if request.token_in_query:
            raise InvalidRequest(
                "send the access token in the Authorization header only", reason="token_in_query"
            )
        scheme, raw_token = parse_authorization(request.authorization, max_token_chars=self.max_token_bytes)
        dpop_values = request.dpop
        proof = None
        if scheme == "DPoP":
            if self.mode == "mtls":
                raise InvalidToken(
                    "this resource accepts certificate-bound tokens only", reason="dpop_not_accepted"
                )
            try:
                htu = _expected_htu(self.public_url, request.raw_path)
            except ValueError:  # absolute-form target, dot segments: not a URL we serve (HOSTILE P11, P12)
                raise InvalidRequest(
                    "request target must be an origin-form path", reason="request_target"
                ) from None
            proof = verify_proof(
                single_dpop_header(dpop_values),
                policy=self.dpop_policy,
                method=request.method,
                htu=htu,
                access_token=raw_token,
                now=now,
                nonce_check=lambda nonce, jkt: self.nonces.check(nonce, jkt, now),
                nonce_issue=lambda jkt: self.nonces.issue(now, jkt),
            )
        elif dpop_values:
            # D16: a DPoP header next to a Bearer token is a confused (or downgrading) client
            raise InvalidToken(
                "a DPoP proof requires the DPoP authorization scheme", reason="token_bearer_with_dpop"
            )

        token = await self.tokens.verify(raw_token, now=now)
        try:
            intent = self._bind(token, proof, der, actor, require_actor=require_actor)
        except BrokerError as exc:
            # a genuine token (signature, issuer, lifetime verified) refused for how it is presented: its
            # refusal is recorded in full under its subject, never folded into unauthenticated noise (§15)
            exc.verified_subject = token.sub
            raise

        return Principal(
            subject=token.sub,
            claims=token.claims,
            actor=actor,
            token=token,
            jkt=proof.jkt if proof else None,
            replay=(f"dpop:{proof.replay_key}", proof.replay_ttl) if proof else None,
            intent=intent,
        )

    def _bind(
        self,
        token: AccessToken,
        proof: VerifiedProof | None,
        der: bytes | None,
        actor: SpiffeId | None,
        *,
        require_actor: bool,
    ) -> Intent | None:
        """The verified token bound to this request (DPoP key or certificate, the agent) and its intent."""
        if proof is not None:
            check_binding(proof, token.cnf_jkt)
        elif token.cnf_jkt is not None:
            raise InvalidToken("DPoP-bound token presented as a bearer token", reason="token_dpop_downgrade")
        if token.cnf_x5t is not None or proof is None:
            # RFC 8705: mtls mode, or a token carrying both bindings (D21): both must hold
            if self.mode == "dpop" and proof is None:
                raise InvalidToken("this resource requires DPoP-bound tokens", reason="token_not_dpop")
            if token.cnf_x5t is None:
                raise InvalidToken("token is not bound to a key or certificate", reason="token_unbound")
            if der is None or not hmac.compare_digest(token.cnf_x5t, cert_thumbprint(der)):
                raise InvalidToken("token is bound to another certificate", reason="token_x5t_mismatch")

        if actor is not None or require_actor:
            bound_actor = token.act_sub if token.act_sub is not None else token.client_id
            if bound_actor is None or actor is None or bound_actor != str(actor):
                raise InvalidToken("token was not issued to this agent", reason="token_actor_mismatch")

        intent = None
        if "authorization_details" in token.claims:
            try:
                intent = parse_token_details(
                    token.claims["authorization_details"], public_url=self.public_url
                )
            except IntentError as exc:  # bounds that cannot be read never pass as no bounds (CONTRACT §17)
                raise InvalidToken(f"access token {exc}", reason=exc.reason) from None
        return intent
