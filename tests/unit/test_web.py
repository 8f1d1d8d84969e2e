"""The approvals page's pure parts (CONTRACT §14): OIDC messages, CSRF decisions, escaping, Slack messages."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from broker.identity.jwks import KeySet
from broker.jose import Signer, generate_ec_jwk
from broker.txn.approval_rules import Approval, Vote, refusal
from broker.txn.webhooks import slack_message
from broker.web import oidc
from broker.web.login_cookie import LoginState, cookie_name, seal, unseal
from broker.web.session import origin_refusal, post_refusal
from broker.web.views import render_list, view_of, visible
from tests.tamper import flip_char

NOW = 1_800_000_000
ISSUER = "https://idp.test"
CLIENT = "broker-approvals"
NONCE = "n" * 43
IDP_JWK = generate_ec_jwk()
SIGNER = Signer.from_jwk(IDP_JWK)
KEYS = KeySet.from_jwks({"keys": [SIGNER.public_jwk()]}).entries


def id_token(signer: Signer = SIGNER, typ: str = "JWT", **changes: Any) -> str:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "carol",
        "aud": CLIENT,
        "iat": NOW,
        "exp": NOW + 300,
        "nonce": NONCE,
        "acr": "mfa",
        "groups": ["managers"],
    }
    claims.update(changes)
    return signer.sign({k: v for k, v in claims.items() if v is not None}, typ=typ)


def verify(token: str) -> oidc.IdToken:
    return oidc.verify_id_token(
        oidc.parse_id_token(token),
        KEYS,
        issuer=ISSUER,
        client_id=CLIENT,
        nonce=NONCE,
        algorithms=["ES256"],
        now=NOW + 10,
        leeway=30,
        max_lifetime=3600,
    )


def test_a_valid_id_token_gives_the_person_and_mfa() -> None:
    verified = verify(id_token())
    assert (verified.sub, verified.mfa, verified.claims["groups"]) == ("carol", True, ["managers"])
    assert verify(id_token(acr=None)).mfa is False


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (id_token(Signer.from_jwk(generate_ec_jwk())), "id_token_signature"),
        (id_token(typ="at+jwt"), "id_token_typ"),  # an access token is not a login
        (id_token(typ="dpop+jwt"), "id_token_typ"),
        (id_token(iss="https://other.test"), "id_token_iss"),
        (id_token(aud="someone-else"), "id_token_aud"),
        (id_token(aud=[CLIENT, "other"]), "id_token_azp"),
        (id_token(nonce="x" * 43), "id_token_nonce"),
        (id_token(nonce=None), "id_token_nonce"),
        (id_token(exp=NOW - 100, iat=NOW - 400), "id_token_expired"),
        (id_token(exp=str(NOW + 300)), "id_token_exp"),
        (id_token(iat=NOW + 600, exp=NOW + 900), "id_token_iat"),
        (id_token(exp=NOW + 86_400), "id_token_iat"),  # lifetime over max_lifetime
        (id_token(sub=""), "id_token_sub"),
        ("a.b", "id_token_jws_segments"),
    ],
    ids=[
        "wrong-key",
        "typ-at+jwt",
        "typ-dpop",
        "iss",
        "aud",
        "multi-aud-without-azp",
        "nonce-mismatch",
        "nonce-missing",
        "expired",
        "exp-string",
        "iat-future",
        "lifetime",
        "sub-empty",
        "malformed",
    ],
)
def test_id_token_refusals(token: str, reason: str) -> None:
    with pytest.raises(oidc.LoginError) as raised:
        verify(token)
    assert raised.value.reason == reason


def test_an_id_token_with_a_jwk_header_is_refused() -> None:
    token = SIGNER.sign({"iss": ISSUER}, typ="JWT", extra_headers={"jwk": SIGNER.public_jwk()})
    with pytest.raises(oidc.LoginError, match="id_token_header"):
        verify(token)


@pytest.mark.parametrize(
    ("query", "expected", "reason"),
    [
        ({"error": "access_denied", "state": "s"}, "s", "issuer_error"),
        ({"code": "c", "state": "s"}, None, "state_missing"),  # this browser started no login
        ({"code": "c", "state": "other"}, "s", "state_mismatch"),
        ({"state": "s"}, "s", "code_missing"),
    ],
    ids=["issuer-error", "no-login-cookie", "state-mismatch", "no-code"],
)
def test_callback_refusals(query: dict[str, str], expected: str | None, reason: str) -> None:
    with pytest.raises(oidc.LoginError) as raised:
        oidc.callback_code(query, expected)
    assert raised.value.reason == reason


def test_authorization_request_has_pkce_s256_and_step_up() -> None:
    endpoints = oidc.provider_endpoints(
        {"issuer": ISSUER, "authorization_endpoint": f"{ISSUER}/a", "token_endpoint": f"{ISSUER}/t"}, ISSUER
    )
    url = oidc.authorization_url(
        endpoints,
        client_id=CLIENT,
        redirect_uri="https://b/cb",
        state="s",
        nonce="n",
        verifier="v" * 43,
        mfa=True,
    )
    assert f"code_challenge={oidc.code_challenge('v' * 43)}" in url
    assert "code_challenge_method=S256" in url and "acr_values=mfa" in url
    # RFC 7636 appendix B
    assert oidc.code_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == (
        "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    )


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        (
            {
                "issuer": "https://evil.test",
                "authorization_endpoint": "https://x/a",
                "token_endpoint": "https://x/t",
            },
            "discovery_issuer_mismatch",
        ),
        (
            {"issuer": ISSUER, "authorization_endpoint": "http://x/a", "token_endpoint": "https://x/t"},
            "discovery_endpoint_not_https",
        ),
        (
            {
                "issuer": ISSUER,
                "authorization_endpoint": "https://x/a",
                "token_endpoint": "https://x/t",
                "code_challenge_methods_supported": ["plain"],
            },
            "discovery_no_pkce_s256",
        ),
    ],
    ids=["other-issuer", "http-endpoint", "no-s256"],
)
def test_discovery_refusals(document: dict[str, Any], reason: str) -> None:
    with pytest.raises(oidc.LoginError) as raised:
        oidc.provider_endpoints(document, ISSUER)
    assert raised.value.reason == reason


ORIGIN = "https://broker.test"
TOKEN = "t" * 43


@pytest.mark.parametrize(
    ("headers", "form_token", "reason"),
    [
        ({"Sec-Fetch-Site": "same-origin", "Origin": ORIGIN}, TOKEN, None),
        ({"Sec-Fetch-Site": "same-origin", "Origin": "null"}, TOKEN, None),  # our no-referrer pages
        ({"Origin": ORIGIN}, TOKEN, None),  # a browser without fetch metadata
        ({"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.test"}, TOKEN, "csrf_fetch_site"),
        ({"Sec-Fetch-Site": "same-site", "Origin": "https://sub.broker.test"}, TOKEN, "csrf_fetch_site"),
        ({"Origin": "null"}, TOKEN, "csrf_origin"),  # null without fetch metadata: a sandboxed frame
        ({}, TOKEN, "csrf_origin"),
        ({"Sec-Fetch-Site": "same-origin", "Origin": ORIGIN}, "u" * 43, "csrf_token"),
        ({"Sec-Fetch-Site": "same-origin", "Origin": ORIGIN}, None, "csrf_token"),
    ],
    ids=[
        "same-origin",
        "null-same-origin",
        "no-fetch-metadata",
        "cross-site",
        "same-site",
        "null-alone",
        "no-headers",
        "wrong-token",
        "no-token",
    ],
)
def test_post_refusal(headers: dict[str, str], form_token: str | None, reason: str | None) -> None:
    assert post_refusal(headers, origin=ORIGIN, form_token=form_token, session_token=TOKEN) == reason


HOSTILE = "<script>alert(1)</script>\u202egnp.exe\u200b" + "A" * 5000


def approval(**arguments: Any) -> Approval:
    return Approval(
        id="a" * 22,
        state="pending",
        required=("manager_approval",),
        tool="approveExpense",
        arguments=arguments,
        args_digest="d",
        subject='alice"><img src=x>',
        actor="spiffe://example.org/agents/expense-assistant",
        reason="above 5000",
        created_at=NOW,
        expires_at=NOW + 3600,
        policy_version="v",
    )


def test_hostile_arguments_are_escaped_and_invisible_characters_shown() -> None:
    view = view_of(approval(invoice_id=HOSTILE), injections={"department": "subject.department"}, now=NOW)
    page = render_list([view], user="carol", csrf=TOKEN)
    assert "<script>" not in page and "<img src=x>" not in page
    assert "&lt;script&gt;" in page
    assert "\u202e" not in page and "\u200b" not in page
    assert "U+202E" in page and "U+200B" in page and 'role="alert"' in page
    assert "A" * 5000 in page  # shown whole, wrapped by the stylesheet
    assert "subject.department" in page
    assert visible("a\u2066b") == 'a<span class="hidden-char">U+2066</span>b'


def test_slack_message_links_the_page_and_escapes_agent_text() -> None:
    message = slack_message(approval(invoice_id="<!channel>"), public_url="https://broker.test")
    text = json.dumps(message)
    assert "https://broker.test/approvals/" + "a" * 22 in text
    assert "<img" not in text and "&lt;img" in text
    assert "<!channel>" not in text  # arguments are never sent to the chat


# --- attacker review (issue 13) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "char",
    [
        "\ufe00",  # variation selector 1
        "\ufe0f",  # variation selector 16
        "\U000e0100",  # variation selector 17
        "\U000e01ef",  # variation selector 256
        "\u034f",  # combining grapheme joiner
        "\u115f",  # Hangul choseong filler
        "\u1160",  # Hangul jungseong filler
        "\u3164",  # Hangul filler
        "\uffa0",  # halfwidth Hangul filler
        "\u2800",  # Braille pattern blank
        "\u00a0",  # no-break space
        "\u2002",  # en space
        "\u3000",  # ideographic space
        "\u202f",  # narrow no-break space
    ],
    ids=lambda c: f"U+{ord(c):04X}",
)
def test_invisible_characters_are_shown_marked(char: str) -> None:
    assert visible(f"a{char}b") == f'a<span class="hidden-char">U+{ord(char):04X}</span>b'


@pytest.mark.parametrize("text", ["a b", "line\nnext", "é", "日本", "ß", "\u00e9t\u00e9"], ids=repr)
def test_visible_text_is_left_alone(text: str) -> None:
    assert visible(text) == text


@pytest.mark.parametrize(
    ("nbf", "reason"),
    [(NOW + 11 + 60, "id_token_nbf"), ("soon", "id_token_nbf"), (NOW, None), (None, None)],
    ids=["nbf-future", "nbf-string", "nbf-past", "nbf-absent"],
)
def test_id_token_nbf_is_checked_when_present(nbf: Any, reason: str | None) -> None:
    token = id_token(nbf=nbf)
    if reason is None:
        assert verify(token).sub == "carol"
        return
    with pytest.raises(oidc.LoginError) as raised:
        verify(token)
    assert raised.value.reason == reason


KEY = bytes(range(32))
LOGIN = LoginState(
    state="s" * 43, nonce="n" * 43, verifier="v" * 43, return_to="/approvals/", mfa=True, expires_at=NOW + 600
)


def test_a_sealed_login_opens_only_with_its_key_state_and_time() -> None:
    sealed = seal(LOGIN, KEY)
    assert "v" * 43 not in sealed and "n" * 43 not in sealed  # the verifier never travels readable
    assert unseal(sealed, KEY, state=LOGIN.state, now=NOW) == LOGIN
    assert cookie_name(LOGIN.state) == "__Host-broker-login-" + "s" * 16


@pytest.mark.parametrize(
    ("value", "key", "state", "now", "reason"),
    [
        (None, KEY, LOGIN.state, NOW, "state_missing"),
        (seal(LOGIN, bytes(32)), KEY, LOGIN.state, NOW, "login_cookie_invalid"),
        (flip_char(seal(LOGIN, KEY)), KEY, LOGIN.state, NOW, "login_cookie_invalid"),
        ("not base64!", KEY, LOGIN.state, NOW, "login_cookie_invalid"),
        ("A" * 3000, KEY, LOGIN.state, NOW, "login_cookie_invalid"),
        ("AAAA", KEY, LOGIN.state, NOW, "login_cookie_invalid"),
        (seal(LOGIN, KEY), KEY, "t" * 43, NOW, "state_mismatch"),
        (seal(LOGIN, KEY), KEY, LOGIN.state, NOW + 600, "state_expired"),
    ],
    ids=["no-cookie", "other-key", "altered", "not-base64", "oversized", "short", "other-state", "expired"],
)
def test_sealed_login_refusals(value: str | None, key: bytes, state: str, now: float, reason: str) -> None:
    with pytest.raises(oidc.LoginError) as raised:
        unseal(value, key, state=state, now=now)
    assert raised.value.reason == reason


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.test"}, "csrf_fetch_site"),
        ({"Origin": "https://evil.test"}, "csrf_origin"),
        ({}, "csrf_origin"),
        ({"Sec-Fetch-Site": "same-origin", "Origin": "null"}, None),
        ({"Origin": ORIGIN}, None),
    ],
    ids=["cross-site", "foreign-origin", "no-origin", "own-page-null", "own-origin"],
)
def test_origin_refusal_without_a_session(headers: dict[str, str], reason: str | None) -> None:
    assert origin_refusal(headers, origin=ORIGIN) == reason


def _eligible(name: str, claims: Any) -> bool:
    return True


@pytest.mark.parametrize(
    ("requester_iss", "votes", "approver", "reason"),
    [
        ("https://a", (), ("https://a", "alice"), "approval_self"),
        # the page's login IdP is another issuer for the same people: the same sub is the same person
        ("https://a", (), ("https://b", "alice"), "approval_self"),
        (None, (), ("https://b", "alice"), "approval_self"),  # an old record without an issuer
        ("https://a", (("https://b", "carol"),), ("https://b", "carol"), "approval_already_decided"),
        ("https://a", (("https://b", "carol"),), ("https://c", "carol"), "approval_already_decided"),
        ("https://a", ((None, "carol"),), ("https://c", "carol"), "approval_already_decided"),
        ("https://a", (("https://a", "carol"),), ("https://b", "dave"), None),
    ],
    ids=[
        "self",
        "self-through-another-issuer",
        "old-requester",
        "double-vote",
        "double-vote-through-another-issuer",
        "old-vote",
        "another-person",
    ],
)
def test_four_eyes_compare_sub_across_issuers(
    requester_iss: str | None,
    votes: tuple[tuple[str | None, str], ...],
    approver: tuple[str, str],
    reason: str | None,
) -> None:
    pending = replace(
        approval(),
        subject="alice",
        issuer=requester_iss,
        required=("dual_approval",),
        approvals=tuple(Vote(sub, "approve", NOW, ("dual_approval",), iss) for iss, sub in votes),
    )
    refused = refusal(
        pending,
        approver_iss=approver[0],
        approver_sub=approver[1],
        approver_claims={},
        eligible=_eligible,
        now=NOW,
    )
    assert (None if refused is None else refused.reason) == reason


def test_old_approval_records_without_issuers_still_load() -> None:
    record = approval().to_record()
    record.pop("issuer")
    record["approvals"] = [
        {"sub": "carol", "decision": "approve", "at": NOW, "satisfies": ["manager_approval"]}
    ]
    loaded = Approval.from_record(record)
    assert loaded.issuer is None and loaded.approvals[0].iss is None
    stored = replace(loaded, issuer="https://a").to_record()
    assert Approval.from_record(stored).issuer == "https://a"


def test_the_list_says_when_it_shows_only_the_oldest() -> None:
    view = view_of(approval(invoice_id="INV-1"), injections={}, now=NOW)
    assert "1 request waiting for your decision." in render_list([view], user="carol", csrf=TOKEN)
    capped = render_list([view, view], user="carol", csrf=TOKEN, total=73)
    assert "73 requests waiting for your decision; the oldest 2 are shown." in capped
