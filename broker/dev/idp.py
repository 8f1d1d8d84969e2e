"""Development IdP (``broker token``): DPoP-bound access tokens for the §10 development PKI.

Not an authorization server: it signs whatever it is asked with ``DIR/idp.jwk`` (the key whose public half is
``DIR/idp-jwks.json``, which the broker trusts for issuer ``https://idp.example.org``). Tokens follow RFC 9068
(header ``typ: at+jwt``) and carry:

- ``iss``, ``sub``, ``aud``, ``iat``, ``exp`` (integers), ``jti`` (random unless given);
- for an agent acting for a user: ``act: {"sub": <agent SPIFFE ID>}`` (RFC 8693 §4.1) and ``client_id`` (the
  same ID, RFC 9068 §2.2), which the broker compares with the peer certificate (CONTRACT §4, dual identity);
- ``cnf: {"jkt": <RFC 7638 thumbprint>}`` binding the token to a DPoP key (RFC 9449 §6.1), or with ``--x5t``
  ``cnf: {"x5t#S256": <certificate thumbprint>}`` binding it to the agent's certificate (RFC 8705 §3.1);
- any further claims (``groups``, ``department``, ``approval_limit``, ``acr``, ``risk_score``, …).

:func:`mint_access_token` is pure (it takes ``now``); the command-line layer (:func:`add_token_parser`,
:func:`cmd_token`) reads the certs folder and the clock. :func:`read_jwk` and :func:`trust_domain_of` read the
§10 layout and are shared with :mod:`broker.sdk.agent` and the demo agent.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.dev.pki import NAME_RE
from broker.errors import InvalidClient
from broker.identity.spiffe import SpiffeId, parse_spiffe_id, validate_trust_domain
from broker.jose import JoseError, Signer, jwk_thumbprint, public_jwk, public_key_from_jwk
from broker.policy.intent import IntentError, parse_token_details

__all__ = [
    "DEFAULT_AUDIENCE",
    "DEFAULT_ISSUER",
    "DEFAULT_TRUST_DOMAIN",
    "RESERVED_CLAIMS",
    "add_token_parser",
    "agent_spiffe_id",
    "cmd_token",
    "jkt_of",
    "mint_access_token",
    "read_jwk",
    "trust_domain_of",
    "x5t_of",
]

DEFAULT_ISSUER = "https://idp.example.org"
DEFAULT_AUDIENCE = "https://broker.example.org"
DEFAULT_TRUST_DOMAIN = "example.org"
#: claims the token's own parameters decide; ``claims`` may not set them (a ``--claim sub=...`` or
#: ``--claim cnf=...`` would silently change who the token is for or which key it is bound to).
RESERVED_CLAIMS = frozenset({"iss", "sub", "aud", "iat", "exp", "jti", "cnf", "act", "client_id"})
#: RFC 9068 §2.1: access tokens in JWT form are typed ``at+jwt``.
ACCESS_TOKEN_TYP = "at+jwt"


def mint_access_token(
    idp_jwk: Mapping[str, Any],
    *,
    sub: str,
    audience: str = DEFAULT_AUDIENCE,
    issuer: str = DEFAULT_ISSUER,
    ttl: int = 3600,
    now: float,
    act_sub: str | None = None,
    cnf_jkt: str | None = None,
    cnf_x5t: str | None = None,
    claims: Mapping[str, Any] | None = None,
    jti: str | None = None,
) -> str:
    """A compact JWS access token signed with ``idp_jwk`` (its ``kid`` and ``alg``, ES256 by default).

    ``iat`` = ``int(now)``, ``exp`` = ``iat + ttl``. ``act_sub`` sets both ``act.sub`` and ``client_id``;
    ``cnf_jkt`` sets ``cnf.jkt``, ``cnf_x5t`` ``cnf.x5t#S256``. ``claims`` are added as given; raises
    :class:`ValueError` when one of them is in :data:`RESERVED_CLAIMS`, when ``sub`` is empty, ``ttl`` is not
    positive, a claim is not JSON, or ``idp_jwk`` is not a private signing key.
    """
    extra = dict(claims or {})
    reserved = sorted(RESERVED_CLAIMS.intersection(extra))
    if reserved:
        raise ValueError(f"reserved claim(s) cannot be set as extra claims: {', '.join(reserved)}")
    if not isinstance(sub, str) or not sub:
        raise ValueError("sub must be a non-empty string")
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
        raise ValueError("ttl must be a positive number of seconds")
    iat = int(now)
    payload: dict[str, Any] = {
        "iss": issuer,
        "sub": sub,
        "aud": audience,
        "iat": iat,
        "exp": iat + ttl,
        "jti": jti if jti is not None else secrets.token_urlsafe(16),
    }
    if act_sub is not None:
        payload["client_id"] = act_sub
        payload["act"] = {"sub": act_sub}
    cnf = {"jkt": cnf_jkt, "x5t#S256": cnf_x5t}
    if cnf_jkt is not None or cnf_x5t is not None:
        payload["cnf"] = {name: value for name, value in cnf.items() if value is not None}
    payload.update(extra)
    try:
        signer = Signer.from_jwk(idp_jwk)
    except JoseError as exc:  # JoseError is a ValueError; say which key was unusable
        raise ValueError(f"IdP key is not usable: {exc}") from exc
    try:
        return signer.sign(payload, typ=ACCESS_TOKEN_TYP)
    except TypeError as exc:  # json.dumps: a claim value that is not JSON (a set, bytes, an object)
        raise ValueError(f"claims must be JSON values: {exc}") from exc


# --- the §10 folder ---------------------------------------------------------------------------------------


def read_jwk(path: Path) -> dict[str, Any]:
    """A JWK (a JSON object) from ``path``; :class:`ValueError` naming the file when unreadable or not one."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(value, dict) or not isinstance(value.get("kty"), str):
        raise ValueError(f"{path} is not a JWK (a JSON object with kty)")
    return value


def jkt_of(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 thumbprint of the public part of ``jwk`` (private or public); ValueError if unusable."""
    try:
        return jwk_thumbprint(public_jwk(public_key_from_jwk(jwk)))
    except (JoseError, TypeError) as exc:
        raise ValueError(f"not a usable public key: {exc}") from exc


def trust_domain_of(ca_pem: Path) -> str | None:
    """The trust domain named by the CA certificate's ``spiffe://<td>`` URI SAN, or None when it has none.

    ``broker certs`` writes that SAN (SPIFFE-ID §3.1). Raises :class:`ValueError` for an unreadable file.
    """
    try:
        cert = x509.load_pem_x509_certificate(Path(ca_pem).read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read {ca_pem}: {exc.strerror or exc}") from exc
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            spiffe_id = parse_spiffe_id(uri)
        except InvalidClient:
            continue
        if not spiffe_id.path:
            return spiffe_id.trust_domain
    return None


def x5t_of(cert_pem: Path) -> str:
    """RFC 8705 §3.1 ``x5t#S256`` of a PEM certificate: base64url(SHA-256(DER)), no padding."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_pem).read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read {cert_pem}: {exc.strerror or exc}") from exc
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def agent_spiffe_id(trust_domain: str, agent: str) -> str:
    """``spiffe://<td>/agents/<agent>``, the ID ``broker certs`` puts in the agent's SVID."""
    return str(SpiffeId(trust_domain, f"/agents/{agent}"))


# --- command line -----------------------------------------------------------------------------------------

_EPILOG = """\
examples:
  # alice, through the expense-assistant agent (token bound to agents/expense-assistant-dpop.jwk):
  broker token --certs certs --sub alice --agent expense-assistant \\
      --claim-json groups='["finance-managers"]' --claim department=42 --claim-json approval_limit=20000

  # carol, an approver acting directly with her own key (no act, no client certificate):
  broker token --certs certs --sub carol --dpop-key certs/humans/carol-dpop.jwk \\
      --claim-json groups='["managers"]' --claim acr=mfa

--claim k=v sets a string; --claim-json k=JSON a typed value (number, list, object, true/false).
--authorization-details JSON bounds the token to the tools it lists (RFC 9396, CONTRACT §17), e.g. at most 5000:
  --authorization-details '[{"type":"tool_invocation","tool":"approveExpense","constraints":{"amount_max":5000}}]'
The names iss, sub, aud, iat, exp, jti, cnf, act and client_id are set by the other flags and refused here.
The token and a newline are printed on stdout; errors go to stderr with exit status 2.
"""


class _UsageError(Exception):
    """A problem with the flags or the certs folder; printed as ``broker token: <message>``, exit 2."""


def add_token_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``token`` subcommand (CONTRACT §1) to a ``broker`` argparse subparsers object; return it."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "token",
        help="development IdP: print a DPoP-bound access token",
        description="Development IdP: sign an access token (RFC 9068) with DIR/idp.jwk, bound (cnf.jkt) to "
        "an agent's DPoP key with act.sub = its SPIFFE ID, or to a human's own key with no act. "
        "For development and tests only.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--certs", required=True, type=Path, metavar="DIR", help="the `broker certs` folder (CONTRACT §10)"
    )
    parser.add_argument("--sub", required=True, metavar="SUBJECT", help="the user the token is for")
    binding = parser.add_mutually_exclusive_group(required=True)
    binding.add_argument(
        "--agent",
        metavar="NAME",
        help="bind to DIR/agents/NAME-dpop.jwk and set act.sub/client_id = spiffe://<td>/agents/NAME",
    )
    binding.add_argument(
        "--dpop-key",
        type=Path,
        metavar="FILE",
        help="bind to this JWK (a human acting directly: no act, no client_id)",
    )
    parser.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="K=V",
        help="add a string claim (repeatable)",
    )
    parser.add_argument(
        "--claim-json",
        action="append",
        default=[],
        metavar="K=JSON",
        help="add a claim whose value is JSON, e.g. groups='[\"finance-managers\"]' (repeatable)",
    )
    parser.add_argument(
        "--x5t",
        action="store_true",
        help="with --agent: bind to the agent's certificate DIR/agents/NAME.pem (RFC 8705 cnf.x5t#S256, for "
        "identity.proof mtls or either) instead of its DPoP key",
    )
    parser.add_argument(
        "--authorization-details",
        metavar="JSON",
        help="add an RFC 9396 authorization_details claim (a JSON array, checked as the broker reads it): the "
        "token then sees and calls only the tool_invocation entries' tools, within their constraints",
    )
    parser.add_argument("--ttl", type=int, default=3600, metavar="SECONDS", help="lifetime (default 3600)")
    parser.add_argument("--audience", default=DEFAULT_AUDIENCE, help=f"aud (default {DEFAULT_AUDIENCE})")
    parser.add_argument("--issuer", default=DEFAULT_ISSUER, help=f"iss (default {DEFAULT_ISSUER})")
    parser.add_argument(
        "--trust-domain",
        metavar="TD",
        help="trust domain of the agent's SPIFFE ID (default: from the URI SAN of DIR/ca.pem, "
        f"else {DEFAULT_TRUST_DOMAIN})",
    )
    parser.set_defaults(func=cmd_token)
    return parser


def _split_claim(item: str, flag: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise _UsageError(f"{flag} expects NAME=VALUE, got {item!r}")
    return name, value


def _collect_claims(plain: Sequence[str], typed: Sequence[str]) -> dict[str, Any]:
    claims: dict[str, Any] = {}
    entries: list[tuple[str, Any]] = [_split_claim(item, "--claim") for item in plain]
    for item in typed:
        name, text = _split_claim(item, "--claim-json")
        try:
            entries.append((name, json.loads(text)))
        except json.JSONDecodeError as exc:
            raise _UsageError(f"--claim-json {name}: not JSON ({exc.msg} at column {exc.colno})") from exc
    for name, value in entries:
        if name in RESERVED_CLAIMS:
            raise _UsageError(f"claim {name!r} is reserved (set by --sub, --agent/--dpop-key, --ttl, …)")
        if name in claims:
            raise _UsageError(f"claim {name!r} given twice")
        claims[name] = value
    return claims


def _with_authorization_details(claims: dict[str, Any], text: str) -> dict[str, Any]:
    if "authorization_details" in claims:
        raise _UsageError("claim 'authorization_details' given twice (--authorization-details and --claim)")
    try:
        details = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _UsageError(f"--authorization-details: not JSON ({exc.msg} at column {exc.colno})") from exc
    try:  # the broker would refuse the token (401 invalid_token): say so now (locations are not checked here)
        parse_token_details(details, public_url="")
    except IntentError as exc:
        raise _UsageError(f"--authorization-details: {exc}") from exc
    return {**claims, "authorization_details": details}


def _trust_domain(args: argparse.Namespace) -> str:
    if args.trust_domain is not None:
        candidate: str | None = args.trust_domain
    else:
        ca = args.certs / "ca.pem"
        candidate = trust_domain_of(ca) if ca.exists() else None
    trust_domain = candidate or DEFAULT_TRUST_DOMAIN
    try:
        return validate_trust_domain(trust_domain)
    except InvalidClient as exc:
        raise _UsageError(f"invalid trust domain {trust_domain!r}: {exc.description}") from exc


def _binding(args: argparse.Namespace) -> tuple[str, str | None]:
    """(cnf.jkt, act.sub or None) from ``--agent`` or ``--dpop-key``."""
    if args.agent is not None:
        name = args.agent
        if NAME_RE.fullmatch(name) is None or name in (".", ".."):  # a file name and a SPIFFE path segment
            raise _UsageError(f"invalid agent name {name!r}")
        key_file = args.certs / "agents" / f"{name}-dpop.jwk"
        return jkt_of(read_jwk(key_file)), agent_spiffe_id(_trust_domain(args), name)
    return jkt_of(read_jwk(args.dpop_key)), None


def cmd_token(args: argparse.Namespace) -> int:
    """``broker token``: print the token and a newline on stdout; 2 with a message on stderr on error."""
    try:
        claims = _collect_claims(args.claim, args.claim_json)
        if args.authorization_details is not None:
            claims = _with_authorization_details(claims, args.authorization_details)
        jkt, act_sub = _binding(args)
        cnf_jkt: str | None = jkt
        cnf_x5t: str | None = None
        if args.x5t:  # RFC 8705: the certificate is the proof of possession, not a DPoP key
            if args.agent is None:
                raise _UsageError("--x5t binds to an agent's certificate: use it with --agent")
            cnf_jkt, cnf_x5t = None, x5t_of(args.certs / "agents" / f"{args.agent}.pem")
        idp_jwk = read_jwk(args.certs / "idp.jwk")
        token = mint_access_token(
            idp_jwk,
            sub=args.sub,
            audience=args.audience,
            issuer=args.issuer,
            ttl=args.ttl,
            now=time.time(),
            act_sub=act_sub,
            cnf_jkt=cnf_jkt,
            cnf_x5t=cnf_x5t,
            claims=claims,
        )
    except (_UsageError, ValueError) as exc:
        print(f"broker token: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(token + "\n")
    return 0
