"""Identity decided on a value (broker.identity.peer.RequestView), without sockets: the stage-0 refusals of the
pipeline as a table, with real certificates, real tokens from the dev IdP and real DPoP proofs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from broker.config.loader import load_config
from broker.dev.idp import mint_access_token
from broker.errors import BrokerError, InvalidClient, InvalidDpopProof, InvalidRequest, InvalidToken
from broker.identity.peer import RequestView
from broker.identity.principal import Authenticator
from broker.jose import jwk_thumbprint
from broker.runtime import build_runtime
from broker.sdk.agent import DpopSigner
from tests.certfactory import Pki

ROOT = Path(__file__).resolve().parents[2]
PUBLIC_URL = "https://localhost:8443"
PATH = "/v1/tools/listInvoices"
AGENT = "spiffe://example.org/agents/expense-assistant"


@pytest.fixture(scope="module")
def authenticator(pki: Pki) -> Authenticator:
    env = {"BROKER_CERTS": str(pki.root), "BROKER_PUBLIC_URL": PUBLIC_URL}
    return build_runtime(load_config(ROOT / "config/examples/expense.yaml", environ=env)).authenticator


def _der(pki: Pki, agent: str) -> bytes:
    cert = x509.load_pem_x509_certificate(pki.agent(agent).cert.read_bytes())
    return cert.public_bytes(Encoding.DER)


def view(pki: Pki, **change: Any) -> RequestView:
    """A valid request of alice's agent; ``change`` breaks one thing."""
    dpop_jwk = json.loads(pki.agent("expense-assistant").dpop_jwk.read_text())
    token = mint_access_token(
        json.loads(pki.idp_jwk.read_text()),
        sub="alice",
        now=time.time(),
        act_sub=AGENT,
        cnf_jkt=jwk_thumbprint(dpop_jwk),
        claims={"department": "42"},
    )
    proof = DpopSigner(dpop_jwk).proof("POST", PUBLIC_URL + PATH, access_token=token)
    fields: dict[str, Any] = {
        "method": "POST",
        "raw_path": PATH,
        "authorization": (f"DPoP {token}",),
        "dpop": (proof,),
        "token_in_query": False,
        "peer_der": _der(pki, "expense-assistant"),
    }
    if change.pop("bearer", False):
        fields["authorization"] = (f"Bearer {token}",)
        fields["dpop"] = ()
    if "peer" in change:
        agent = change.pop("peer")
        fields["peer_der"] = None if agent is None else _der(pki, agent)
    return RequestView(**{**fields, **change})


ROWS = [
    ("M01-no-certificate", {"peer": None}, InvalidClient, "svid_missing"),
    ("row13-another-agents-certificate", {"peer": "travel-bot"}, InvalidToken, "token_actor_mismatch"),
    ("token-in-query", {"token_in_query": True}, InvalidRequest, "token_in_query"),
    ("D16-dpop-token-as-bearer", {"bearer": True}, InvalidToken, "token_dpop_downgrade"),
    ("row14-no-proof", {"dpop": ()}, InvalidDpopProof, "dpop_missing"),
    ("D01-two-proofs", {"dpop": ("a", "b")}, InvalidDpopProof, "dpop_multiple_headers"),
    ("htm-mismatch", {"method": "GET"}, InvalidDpopProof, None),
    ("htu-mismatch", {"raw_path": "/v1/tools/approveExpense"}, InvalidDpopProof, None),
    ("no-authorization", {"authorization": ()}, InvalidToken, None),
]


@pytest.mark.parametrize(("change", "error", "reason"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
async def test_identity_refusals(
    authenticator: Authenticator, pki: Pki, change: dict[str, Any], error: type, reason: str | None
) -> None:
    with pytest.raises(BrokerError) as refused:
        await authenticator.authenticate(view(pki, **change), now=time.time())
    assert type(refused.value) is error
    if reason is not None:
        assert refused.value.reason == reason


async def test_a_valid_request_names_both_identities(authenticator: Authenticator, pki: Pki) -> None:
    principal = await authenticator.authenticate(view(pki), now=time.time())
    assert (principal.subject, principal.actor_id) == ("alice", AGENT)
    assert principal.replay is not None  # the proof's jti, for the pipeline's guard to claim
