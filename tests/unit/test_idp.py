"""The development IdP: ``mint_access_token`` and the ``broker token`` command (CONTRACT §1).

Tokens are checked the way the broker checks them: with :class:`AccessTokenVerifier` and the JWKS that
``broker certs`` wrote. The command is driven through argparse exactly as ``broker/cli.py`` wires it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from broker.dev.idp import RESERVED_CLAIMS, add_token_parser, jkt_of, mint_access_token, read_jwk
from broker.identity.issuer_keys import IssuerKeys
from broker.identity.tokens import AccessToken, AccessTokenVerifier, IssuerPolicy
from broker.jose import b64url_decode, jwk_thumbprint, public_jwk, public_key_from_jwk
from tests.certfactory import Pki, make_pki

ISSUER = "https://idp.example.org"
AUDIENCE = "https://broker.example.org"
NOW = 1_800_000_000


def parser() -> argparse.ArgumentParser:
    """The ``broker`` tree as cli.py builds it: a subparsers object with ``token`` added."""
    root = argparse.ArgumentParser(prog="broker")
    sub = root.add_subparsers(dest="command", required=True)
    add_token_parser(sub)
    return root


def run_token(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    args = parser().parse_args(["token", *argv])
    code: int = args.func(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def segment(token: str, index: int) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(b64url_decode(token.split(".")[index]))
    return value


async def verify(pki: Pki, token: str, *, now: float = NOW, audience: str = AUDIENCE) -> AccessToken:
    keys = IssuerKeys(ISSUER, jwks_file=pki.idp_jwks)
    verifier = AccessTokenVerifier([(IssuerPolicy(ISSUER, ("ES256",), audience), keys)])
    return await verifier.verify(token, now=now)


def jkt_of_file(path: Path) -> str:
    return jwk_thumbprint(public_jwk(public_key_from_jwk(json.loads(path.read_text()))))


# --- mint_access_token ----------------------------------------------------------------------------------


async def test_minted_token_verifies_and_has_rfc9068_header(pki: Pki) -> None:
    idp = read_jwk(pki.idp_jwk)
    token = mint_access_token(idp, sub="alice", now=NOW + 0.9, ttl=600)
    header, claims = segment(token, 0), segment(token, 1)
    assert header == {"alg": "ES256", "typ": "at+jwt", "kid": idp["kid"]}
    assert (claims["iss"], claims["aud"], claims["sub"]) == (ISSUER, AUDIENCE, "alice")
    assert (claims["iat"], claims["exp"]) == (NOW, NOW + 600)  # integers, not floats
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16
    assert not {"act", "cnf", "client_id"} & claims.keys()
    verified = await verify(pki, token)
    assert verified.sub == "alice" and verified.exp == NOW + 600


def test_jti_is_random_unless_given(pki: Pki) -> None:
    idp = read_jwk(pki.idp_jwk)
    first, second = (segment(mint_access_token(idp, sub="a", now=NOW), 1)["jti"] for _ in range(2))
    assert first != second
    assert segment(mint_access_token(idp, sub="a", now=NOW, jti="fixed"), 1)["jti"] == "fixed"


async def test_issuer_and_audience_are_parameters(pki: Pki) -> None:
    idp = read_jwk(pki.idp_jwk)
    token = mint_access_token(idp, sub="a", now=NOW, audience="https://other.example", issuer=ISSUER)
    assert segment(token, 1)["aud"] == "https://other.example"
    await verify(pki, token, audience="https://other.example")


@pytest.mark.parametrize("name", sorted(RESERVED_CLAIMS))
def test_reserved_claims_are_refused(pki: Pki, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        mint_access_token(read_jwk(pki.idp_jwk), sub="alice", now=NOW, claims={name: "x"})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sub": ""}, "sub"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": -5}, "ttl"),
        ({"claims": {"groups": {"a"}}}, "JSON"),
    ],
    ids=["empty-sub", "zero-ttl", "negative-ttl", "claim-not-json"],
)
def test_bad_parameters_are_refused(pki: Pki, kwargs: dict[str, Any], match: str) -> None:
    arguments: dict[str, Any] = {"sub": "alice", "now": NOW, **kwargs}
    with pytest.raises(ValueError, match=match):
        mint_access_token(read_jwk(pki.idp_jwk), **arguments)


def test_public_key_cannot_sign(pki: Pki) -> None:
    public = json.loads(pki.idp_jwks.read_text())["keys"][0]
    with pytest.raises(ValueError, match="IdP key"):
        mint_access_token(public, sub="alice", now=NOW)


# --- broker token ---------------------------------------------------------------------------------------


async def test_agent_token_matches_the_flags(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_token(
        [
            "--certs", str(pki.root), "--sub", "alice", "--agent", "expense-assistant",
            "--claim-json", 'groups=["finance-managers"]', "--claim", "department=42",
            "--claim-json", "approval_limit=20000", "--ttl", "900",
        ],
        capsys,
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert out.endswith("\n") and out.count("\n") == 1  # the token and a newline, nothing else
    token = out.strip()
    claims = segment(token, 1)
    verified = await verify(pki, token, now=claims["iat"])
    agent_id = "spiffe://example.org/agents/expense-assistant"
    assert verified.sub == "alice"
    assert verified.act_sub == agent_id and verified.client_id == agent_id
    assert verified.cnf_jkt == jkt_of_file(pki.agent("expense-assistant").dpop_jwk)
    assert claims["exp"] - claims["iat"] == 900
    assert claims["groups"] == ["finance-managers"]
    assert claims["department"] == "42"
    assert claims["approval_limit"] == 20000


async def test_human_token_has_no_act(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    key = pki.human_dpop("carol")
    code, out, _ = run_token(
        ["--certs", str(pki.root), "--sub", "carol", "--dpop-key", str(key), "--claim", "acr=mfa"], capsys
    )
    assert code == 0
    token = out.strip()
    verified = await verify(pki, token, now=segment(token, 1)["iat"])
    assert verified.act_sub is None and verified.client_id is None
    assert verified.cnf_jkt == jkt_of_file(key)
    assert verified.claims["acr"] == "mfa"


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--claim", "department=42", "42"),
        ("--claim", "note=a=b", "a=b"),
        ("--claim", "empty=", ""),
        ("--claim-json", "approval_limit=20000", 20000),
        ("--claim-json", "risk_score=85.5", 85.5),
        ("--claim-json", "mfa=true", True),
        ("--claim-json", 'groups=["finance-managers","managers"]', ["finance-managers", "managers"]),
        ("--claim-json", 'department="42"', "42"),
        ("--claim-json", 'meta={"a":[1,null]}', {"a": [1, None]}),
    ],
    ids=[
        "string",
        "string-with-equals",
        "empty-string",
        "int",
        "float",
        "bool",
        "list",
        "json-string",
        "object",
    ],
)
def test_claim_typing(
    pki: Pki, capsys: pytest.CaptureFixture[str], flag: str, value: str, expected: Any
) -> None:
    code, out, _ = run_token(
        ["--certs", str(pki.root), "--sub", "alice", "--agent", "expense-assistant", flag, value], capsys
    )
    assert code == 0
    name = value.partition("=")[0]
    assert segment(out.strip(), 1)[name] == expected


@pytest.mark.parametrize(
    "flag_value",
    [f"--claim={name}=x" for name in sorted(RESERVED_CLAIMS)]
    + [f'--claim-json={name}="x"' for name in ("sub", "cnf", "act")],
    ids=[f"claim-{name}" for name in sorted(RESERVED_CLAIMS)] + ["json-sub", "json-cnf", "json-act"],
)
def test_reserved_claim_names_are_refused(
    pki: Pki, capsys: pytest.CaptureFixture[str], flag_value: str
) -> None:
    code, out, err = run_token(
        ["--certs", str(pki.root), "--sub", "alice", "--agent", "expense-assistant", flag_value], capsys
    )
    assert (code, out) == (2, "")
    assert "reserved" in err


@pytest.mark.parametrize(
    ("extra", "expected_in_err"),
    [
        (["--agent", "no-such-agent"], "no-such-agent-dpop.jwk"),
        (["--agent", "../humans/carol"], "invalid agent name"),
        (["--agent", ".."], "invalid agent name"),
        (["--dpop-key", "/nonexistent/key.jwk"], "/nonexistent/key.jwk"),
        (["--agent", "expense-assistant", "--claim-json", "groups=[finance]"], "not JSON"),
        (["--agent", "expense-assistant", "--claim", "department"], "NAME=VALUE"),
        (["--agent", "expense-assistant", "--claim", "=42"], "NAME=VALUE"),
        (["--agent", "expense-assistant", "--claim", "a=1", "--claim-json", "a=1"], "twice"),
        (["--agent", "expense-assistant", "--ttl", "0"], "ttl"),
        (["--agent", "expense-assistant", "--trust-domain", "Bad.Domain"], "trust domain"),
    ],
    ids=[
        "unknown-agent",
        "agent-path-traversal",
        "agent-dot-dot",
        "missing-dpop-key",
        "bad-json",
        "claim-without-equals",
        "claim-without-name",
        "duplicate-claim",
        "zero-ttl",
        "bad-trust-domain",
    ],
)
def test_usage_errors_exit_2(
    pki: Pki, capsys: pytest.CaptureFixture[str], extra: list[str], expected_in_err: str
) -> None:
    code, out, err = run_token(["--certs", str(pki.root), "--sub", "alice", *extra], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("broker token: ") and expected_in_err in err


def test_not_a_jwk_exits_2(pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jwk"
    bad.write_text('["not", "a", "jwk"]')
    code, out, err = run_token(["--certs", str(pki.root), "--sub", "a", "--dpop-key", str(bad)], capsys)
    assert (code, out) == (2, "") and "not a JWK" in err


def test_missing_idp_key_exits_2(pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = pki.human_dpop("carol")
    code, out, err = run_token(["--certs", str(tmp_path), "--sub", "a", "--dpop-key", str(key)], capsys)
    assert (code, out) == (2, "") and "idp.jwk" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--certs", "certs", "--sub", "alice"],
        ["--certs", "certs", "--sub", "alice", "--agent", "a", "--dpop-key", "k.jwk"],
        ["--certs", "certs", "--agent", "a"],
        ["--sub", "alice", "--agent", "a"],
        ["--certs", "certs", "--sub", "alice", "--agent", "a", "--ttl", "soon"],
    ],
    ids=["neither-agent-nor-dpop-key", "both-agent-and-dpop-key", "no-sub", "no-certs", "ttl-not-int"],
)
def test_argparse_refuses_bad_command_lines(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(["token", *argv])
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_help_has_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(["token", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "broker token --certs certs --sub alice --agent expense-assistant" in text
    assert "--claim-json" in text and "--dpop-key" in text


# --- trust domain of act.sub ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corp_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("corp"), trust_domain="corp.test", agents=("bot",), humans=())


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], "spiffe://corp.test/agents/bot"),
        (["--trust-domain", "other.test"], "spiffe://other.test/agents/bot"),
    ],
    ids=["from-ca-san", "flag-wins"],
)
def test_trust_domain_of_act_sub(
    corp_pki: Pki, capsys: pytest.CaptureFixture[str], extra: list[str], expected: str
) -> None:
    code, out, _ = run_token(["--certs", str(corp_pki.root), "--sub", "a", "--agent", "bot", *extra], capsys)
    assert code == 0
    claims = segment(out.strip(), 1)
    assert claims["act"] == {"sub": expected} and claims["client_id"] == expected


def test_trust_domain_defaults_without_ca(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A folder with only the IdP key and one agent key: no ca.pem to read the trust domain from.
    (tmp_path / "agents").mkdir()
    (tmp_path / "idp.jwk").write_text(pki.idp_jwk.read_text())
    (tmp_path / "agents" / "bot-dpop.jwk").write_text(pki.agent("travel-bot").dpop_jwk.read_text())
    code, out, _ = run_token(["--certs", str(tmp_path), "--sub", "a", "--agent", "bot"], capsys)
    assert code == 0
    assert segment(out.strip(), 1)["act"] == {"sub": "spiffe://example.org/agents/bot"}


def test_jkt_of_private_and_public_agree(pki: Pki) -> None:
    private = read_jwk(pki.agent("expense-assistant").dpop_jwk)
    public = {k: v for k, v in private.items() if k != "d"}
    assert jkt_of(private) == jkt_of(public) == private["kid"]


# --- --authorization-details (CONTRACT §17) ---------------------------------------------------------------

BOUNDED = '[{"type":"tool_invocation","tool":"approveExpense","constraints":{"amount_max":5000}}]'


def test_authorization_details_become_the_claim(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_token(
        ["--certs", str(pki.root), "--sub", "alice", "--agent", "expense-assistant",
         "--authorization-details", BOUNDED],
        capsys,
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert segment(out.strip(), 1)["authorization_details"] == json.loads(BOUNDED)


@pytest.mark.parametrize(
    ("value", "extra", "expected_in_err"),
    [
        ("[{", [], "not JSON"),
        ('{"type":"tool_invocation"}', [], "JSON array"),
        ('[{"type":"tool_invocation","tool":"x","constraints":{"x_max":"9"}}]', [], "must be a number"),
        ('[{"type":"tool_invocation","tool":"x","limit":1}]', [], "unknown member 'limit'"),
        (BOUNDED, ["--claim-json", "authorization_details=[]"], "twice"),
    ],
    ids=["not-json", "not-array", "max-not-number", "unknown-member", "also-as-claim"],
)
def test_unreadable_authorization_details_exit_2(
    pki: Pki, capsys: pytest.CaptureFixture[str], value: str, extra: list[str], expected_in_err: str
) -> None:
    code, out, err = run_token(
        ["--certs", str(pki.root), "--sub", "alice", "--agent", "expense-assistant",
         "--authorization-details", value, *extra],
        capsys,
    )  # fmt: skip
    assert (code, out) == (2, "")
    assert err.startswith("broker token: --authorization-details") or "twice" in err
    assert expected_in_err in err
