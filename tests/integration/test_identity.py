"""The identity stage through the real listener: each row breaks exactly one thing of a valid call.

Every refusal asserts the status, the error code, the ``WWW-Authenticate`` parameters, that the upstream saw
nothing, and that the audit record names the precise reason. Pure checks have their own unit tables
(test_dpop, test_tokens, test_spiffe); these rows prove the wiring and the order.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.identity.dpop import ath_for
from broker.jose import jwk_thumbprint
from tests.certfactory import Pki, der_of
from tests.conftest import BrokerFactory, BrokerUnderTest, Caller, RecordingUpstream, base_config
from tests.dpopfactory import ec_key, make_proof
from tests.tamper import flip_char
from tests.tokenfactory import OMIT, make_token

TOOL = "/v1/tools/approveExpense"
INVOICE = {"invoice_id": "INV-8831", "amount": 4800}


def challenge_params(header: str) -> dict[str, str]:
    scheme, _, rest = header.partition(" ")
    params = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', rest))
    params["scheme"] = scheme
    return params


def other_token(caller: Caller) -> str:
    idp = json.loads(caller.broker.pki.idp_jwk.read_text())
    return make_token(idp, claims={"sub": "mallory"}, now=int(time.time()))


Tamper = Callable[[Caller], dict[str, Any]]


def proof(caller: Caller, **overrides: Any) -> str:
    return caller.proof("POST", TOOL, **overrides)


def auth(caller: Caller, **overrides: Any) -> dict[str, str]:
    return {"Authorization": f"DPoP {caller.token}", "DPoP": proof(caller, **overrides)}


ROWS: list[tuple[str, Tamper, int, str, str]] = [
    (
        "D01-no-proof",
        lambda c: {"Authorization": f"DPoP {c.token}"},
        401,
        "invalid_dpop_proof",
        "dpop_missing",
    ),
    (
        "D02-comma-joined-proofs",
        lambda c: {"Authorization": f"DPoP {c.token}", "DPoP": f"{proof(c)}, {proof(c)}"},
        401,
        "invalid_dpop_proof",
        "dpop_multiple_values",
    ),
    (
        "D03-typ-jwt",
        lambda c: auth(c, header_overrides={"typ": "JWT"}),
        401,
        "invalid_dpop_proof",
        "dpop_typ",
    ),
    (
        "D08-htm-get",
        lambda c: auth(c, payload_overrides={"htm": "GET"}),
        401,
        "invalid_dpop_proof",
        "dpop_htm_mismatch",
    ),
    (
        "D09e-htu-other-host",
        lambda c: auth(c, payload_overrides={"htu": "https://other.example.org" + TOOL}),
        401,
        "invalid_dpop_proof",
        "dpop_htu_mismatch",
    ),
    (
        "D09b-htu-trailing-slash",
        lambda c: auth(c, payload_overrides={"htu": c.broker.public_url + TOOL + "/"}),
        401,
        "invalid_dpop_proof",
        "dpop_htu_mismatch",
    ),
    (
        "D11-stale-iat",
        lambda c: auth(c, payload_overrides={"iat": int(time.time()) - 600}),
        401,
        "invalid_dpop_proof",
        "dpop_iat_stale",
    ),
    (
        "D14-ath-of-another-token",
        lambda c: auth(c, payload_overrides={"ath": ath_for(other_token(c))}),
        401,
        "invalid_dpop_proof",
        "dpop_ath_mismatch",
    ),
    (
        "D15-proof-by-another-key",
        lambda c: {
            "Authorization": f"DPoP {c.token}",
            "DPoP": make_proof(
                ec_key(),
                htm="POST",
                htu=c.broker.public_url + TOOL,
                iat=int(time.time()),
                ath=ath_for(c.token),
            ),
        },
        401,
        "invalid_dpop_proof",
        "dpop_jkt_mismatch",
    ),
    (
        "D16-dpop-bound-token-as-bearer",
        lambda c: {"Authorization": f"Bearer {c.token}"},
        401,
        "invalid_token",
        "token_dpop_downgrade",
    ),
    (
        "D16-bearer-with-proof",
        lambda c: {"Authorization": f"Bearer {c.token}", "DPoP": proof(c)},
        401,
        "invalid_token",
        "token_bearer_with_dpop",
    ),
    ("no-authorization", lambda c: {"DPoP": proof(c)}, 401, "invalid_token", "authorization_missing"),
    (
        "D19-double-space",
        lambda c: {"Authorization": f"DPoP  {c.token}", "DPoP": proof(c)},
        400,
        "invalid_request",
        "authorization_malformed",
    ),
]


@pytest.mark.parametrize(
    ("tamper", "status", "code", "reason"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
async def test_each_broken_check_is_refused_and_nothing_forwarded(
    broker: BrokerUnderTest, upstream: RecordingUpstream, tamper: Tamper, status: int, code: str, reason: str
) -> None:
    caller = broker.caller()
    reply = await caller.call("POST", TOOL, INVOICE, auth=tamper(caller))
    assert (reply.status, reply.error) == (status, code)
    assert upstream.received == []
    if status == 401:
        params = challenge_params(reply.headers["WWW-Authenticate"])
        assert params["scheme"] == "DPoP" and params["error"] == code
        assert params["algs"] == "ES256 EdDSA"
        assert params["resource_metadata"] == "https://localhost:8443/.well-known/oauth-protected-resource"
    last = broker.audit_records()[-1]
    assert (last["event"], last["decision"], last["reason"], last["status"]) == (
        "invocation",
        "deny",
        reason,
        status,
    )


@pytest.mark.parametrize(
    ("claims", "header", "reason"),
    [
        ({"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}, {}, "token_expired"),
        ({"aud": "https://other.example.org"}, {}, "token_aud"),
        ({"iss": "https://idp.example.org/"}, {}, "token_iss"),
        ({}, {"typ": "dpop+jwt"}, "token_typ"),
        ({}, {"alg": "ES384"}, "token_alg_not_allowed"),
        ({"exp": str(int(time.time()) + 600)}, {}, "token_claim_type"),
    ],
    ids=[
        "J16-expired",
        "J20-aud",
        "J21-iss-trailing-slash",
        "J23-typ-dpop",
        "J02-alg-not-allowed",
        "J18-exp-string",
    ],
)
async def test_bad_access_tokens_are_invalid_token(
    broker: BrokerUnderTest,
    upstream: RecordingUpstream,
    claims: dict[str, Any],
    header: dict[str, Any],
    reason: str,
) -> None:
    caller = broker.caller()
    idp = json.loads(broker.pki.idp_jwk.read_text())
    base = {"cnf": {"jkt": jwk_thumbprint(caller.dpop_jwk)}, **claims}
    caller.token = make_token(idp, header=header, claims=base, now=int(time.time()), sign_alg="ES256")
    reply = await caller.call("POST", TOOL, INVOICE)
    assert (reply.status, reply.error) == (401, "invalid_token")
    assert challenge_params(reply.headers["WWW-Authenticate"])["error"] == "invalid_token"
    assert upstream.received == []
    assert broker.audit_records()[-1]["reason"] == reason


async def test_two_dpop_headers_are_refused(broker: BrokerUnderTest, upstream: RecordingUpstream) -> None:
    caller = broker.caller()
    headers = [("Authorization", f"DPoP {caller.token}"), ("DPoP", proof(caller)), ("DPoP", proof(caller))]
    async with (
        broker.session() as session,
        session.post(broker.url + TOOL, json=INVOICE, headers=aiohttp.typedefs.CIMultiDict(headers)) as resp,
    ):
        body = await resp.json()
    assert (resp.status, body["error"]) == (401, "invalid_dpop_proof")
    assert upstream.received == []


async def test_token_in_query_string_is_refused(broker: BrokerUnderTest, upstream: RecordingUpstream) -> None:
    caller = broker.caller()
    reply = await caller.call("POST", TOOL + "?access_token=" + caller.token, INVOICE)
    assert (reply.status, reply.error) == (400, "invalid_request")
    assert upstream.received == []


async def test_replayed_proof_is_refused_once_accepted(
    broker: BrokerUnderTest, upstream: RecordingUpstream
) -> None:
    caller = broker.caller()
    headers = caller.auth_headers("POST", TOOL)
    first = await caller.call("POST", TOOL, INVOICE, auth=headers)
    second = await caller.call("POST", TOOL, INVOICE, auth=headers)
    assert first.status == 200
    assert (second.status, second.error) == (401, "invalid_dpop_proof")
    assert len(upstream.received) == 1
    assert broker.audit_records()[-1]["reason"] == "dpop_replay"
    metrics = await _metrics(broker)
    assert "broker_dpop_replays_total 1.0" in metrics
    assert 'broker_auth_failures_total{reason="dpop_replay"} 1.0' in metrics


async def test_an_invalid_proof_does_not_burn_its_jti(broker: BrokerUnderTest) -> None:
    caller = broker.caller()
    jti = "fixed-jti-1"
    bad = {
        "Authorization": f"DPoP {caller.token}",
        "DPoP": proof(caller, jti=jti, payload_overrides={"htm": "GET"}),
    }
    assert (await caller.call("POST", TOOL, INVOICE, auth=bad)).status == 401
    good = {"Authorization": f"DPoP {caller.token}", "DPoP": proof(caller, jti=jti)}
    assert (await caller.call("POST", TOOL, INVOICE, auth=good)).status == 200


async def test_actor_mismatch_is_invalid_token(
    broker: BrokerUnderTest, upstream: RecordingUpstream, pki: Pki
) -> None:
    # CONTRACT §11 row 13: alice's token for expense-assistant, presented with travel-bot's certificate
    caller = broker.caller()
    travel = pki.agent("travel-bot")
    caller.cert, caller.key = travel.cert, travel.key
    reply = await caller.call("POST", TOOL, INVOICE)
    assert (reply.status, reply.error) == (401, "invalid_token")
    assert upstream.received == []
    assert broker.audit_records()[-1]["reason"] == "token_actor_mismatch"


async def test_token_without_act_is_refused_on_agent_routes(broker: BrokerUnderTest) -> None:
    caller = broker.caller(claims={"act": OMIT, "client_id": OMIT})
    reply = await caller.call("POST", TOOL, INVOICE)
    assert (reply.status, reply.error) == (401, "invalid_token")


async def test_protected_resource_metadata(broker: BrokerUnderTest) -> None:
    reply = await broker.caller().call("GET", "/.well-known/oauth-protected-resource", auth={})
    assert reply.status == 200
    assert reply.body == {
        "resource": "https://localhost:8443",
        "authorization_servers": ["https://idp.example.org"],
        "bearer_methods_supported": ["header"],
        "dpop_bound_access_tokens_required": True,
        "dpop_signing_alg_values_supported": ["ES256", "EdDSA"],
        "tls_client_certificate_bound_access_tokens": False,
    }


async def test_nonce_is_demanded_then_accepted(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["identity"]["dpop"] = {"require_nonce": True, "nonce_secret": "n" * 32}
    broker = await broker_factory(config)
    caller = broker.caller()
    first = await caller.call("POST", TOOL, INVOICE)
    assert (first.status, first.error) == (401, "use_dpop_nonce")
    nonce = first.headers["DPoP-Nonce"]
    assert upstream.received == []
    retry = {"Authorization": f"DPoP {caller.token}", "DPoP": proof(caller, nonce=nonce)}
    assert (await caller.call("POST", TOOL, INVOICE, auth=retry)).status == 200
    forged = {"Authorization": f"DPoP {caller.token}", "DPoP": proof(caller, nonce=flip_char(nonce))}
    assert (await caller.call("POST", TOOL, INVOICE, auth=forged)).error == "use_dpop_nonce"


def _x5t(cert: Path) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(der_of(cert)).digest()).rstrip(b"=").decode()


async def test_certificate_bound_tokens_in_mtls_mode(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["identity"]["proof"] = "mtls"
    broker = await broker_factory(config)
    agent_cert = pki.agent("expense-assistant").cert
    bound = broker.caller(claims={"cnf": {"x5t#S256": _x5t(agent_cert)}})
    ok = await bound.call("POST", TOOL, INVOICE, auth={"Authorization": f"Bearer {bound.token}"})
    assert ok.status == 200
    # M15: bound to another certificate
    other = broker.caller(claims={"cnf": {"x5t#S256": _x5t(pki.agent("travel-bot").cert)}})
    refused = await other.call("POST", TOOL, INVOICE, auth={"Authorization": f"Bearer {other.token}"})
    assert (refused.status, refused.error, broker.audit_records()[-1]["reason"]) == (
        401,
        "invalid_token",
        "token_x5t_mismatch",
    )
    # a DPoP proof is not accepted in mtls mode
    dpop = broker.caller()
    assert (await dpop.call("POST", TOOL, INVOICE)).error == "invalid_token"
    assert len(upstream.received) == 1


async def _metrics(broker: BrokerUnderTest) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{broker.admin_url}/metrics") as resp:
        return await resp.text()
