"""``broker check``'s one pass (issue 14): every file a config names is loaded, each problem is reported once at the
line that names the file, with its path; model errors, CEL errors and file errors come together; an unknown key
names the nearest known one. Configs are real files in tmp_path over a real development PKI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from broker.config.check import check_config
from tests.certfactory import Pki

# Line numbers matter: each row's expected message names the line of the key it breaks.
TEMPLATE = """\
version: 1
server:
  listen: 127.0.0.1:0
  admin_listen: 127.0.0.1:0
  public_url: https://localhost:8443
  admin_token_file: {admin_token}
  tls:
    cert: {cert}
    key: {key}
    client_ca: {client_ca}
identity:
  trust_domain: example.org
  audience: https://broker.example.org
  issuers:
    - issuer: https://idp.example.org
      jwks_file: {jwks}
      ca: {issuer_ca}
signing:
  key_file: {signing}
  previous_key_files: [{previous}]
audit:
  file: {audit}
  checkpoint_every: 5
tools:
  - name: approveExpense
    upstream:
      url: https://127.0.0.1:1/approve
  - name: listInvoices
    upstream:
      url: https://127.0.0.1:1/invoices
      tls: {{ca: {upstream_ca}, cert: {upstream_cert}, key: {upstream_key}}}
policies:
  - id: anyone
    tools: [approveExpense, listInvoices]
    when: actor.id != ""
approvals:
  webhooks:
    - url: https://hooks.example.org/approvals
      ca: {webhook_ca}
"""


def good_files(pki: Pki, tmp: Path) -> dict[str, Path]:
    token = tmp / "admin-token"
    token.write_text("0123456789abcdef0123456789abcdef\n")
    return {
        "admin_token": token,
        "cert": pki.broker,
        "key": pki.broker_key,
        "client_ca": pki.ca,
        "jwks": pki.idp_jwks,
        "issuer_ca": pki.ca,
        "signing": pki.signing_jwk,
        "previous": pki.signing_jwk,
        "audit": tmp / "var" / "audit.jsonl",
        "upstream_ca": pki.ca,
        "upstream_cert": pki.backend,
        "upstream_key": pki.backend_key,
        "webhook_ca": pki.ca,
    }


def write_config(tmp: Path, files: dict[str, Path], text: str = TEMPLATE) -> Path:
    path = tmp / "broker.yaml"
    path.write_text(text.format(**{k: str(v) for k, v in files.items()}))
    return path


def test_the_template_is_clean(pki: Pki, tmp_path: Path) -> None:
    result = check_config(write_config(tmp_path, good_files(pki, tmp_path)), environ={})
    assert result.problems == [] and result.loaded is not None


Breaks = Callable[[dict[str, Path], Path, Pki], str]  # changes files, returns the expected message


def missing(key: str, line: int, where: str) -> Breaks:
    def breaks(files: dict[str, Path], tmp: Path, pki: Pki) -> str:
        files[key] = tmp / "absent" / f"{key}.pem"
        return f"{line}: {where}: cannot read {files[key]}: No such file or directory"

    return breaks


def replaced(key: str, line: int, where: str, by: Callable[[Pki, Path], Path], what: str) -> Breaks:
    def breaks(files: dict[str, Path], tmp: Path, pki: Pki) -> str:
        files[key] = by(pki, tmp)
        return f"{line}: {where}: " + what.format(path=files[key], pki=pki.root)

    return breaks


def text_file(name: str, text: str) -> Callable[[Pki, Path], Path]:
    def make(pki: Pki, tmp: Path) -> Path:
        path = tmp / name
        path.write_text(text)
        return path

    return make


ROWS: list[tuple[str, Breaks]] = [
    ("server-cert-missing", missing("cert", 8, "server.tls.cert")),
    ("server-key-missing", missing("key", 9, "server.tls.key")),
    ("client-ca-missing", missing("client_ca", 10, "server.tls.client_ca")),
    (
        "server-cert-not-pem",
        replaced("cert", 8, "server.tls.cert", lambda p, t: p.signing_jwk, "{path}: not a PEM certificate"),
    ),
    (
        "server-key-not-pem",
        replaced("key", 9, "server.tls.key", lambda p, t: p.ca, "{path}: not a PEM private key"),
    ),
    (
        "server-key-mismatch",
        replaced(
            "key",
            9,
            "server.tls.key",
            lambda p, t: p.backend_key,
            "{path} does not match the certificate {pki}/broker.pem",
        ),
    ),
    (
        "client-ca-not-pem",
        replaced(
            "client_ca",
            10,
            "server.tls.client_ca",
            text_file("empty.pem", "not a certificate\n"),
            "{path}: no usable CA certificate (NO_CERTIFICATE_OR_CRL_FOUND)",
        ),
    ),
    ("admin-token-missing", missing("admin_token", 6, "server.admin_token_file")),
    (
        "admin-token-short",
        replaced(
            "admin_token",
            6,
            "server.admin_token_file",
            text_file("short-token", "secret\n"),
            "{path}: the admin token must be at least 16 characters",
        ),
    ),
    ("jwks-missing", missing("jwks", 16, "identity.issuers[0].jwks_file")),
    (
        "jwks-not-json",
        replaced(
            "jwks",
            16,
            "identity.issuers[0].jwks_file",
            lambda p, t: p.ca,
            "{path}: not JSON (line 1 column 1: Expecting value)",
        ),
    ),
    (
        "jwks-not-a-key-set",
        replaced(
            "jwks",
            16,
            "identity.issuers[0].jwks_file",
            text_file("jwks.json", '{"kty": "EC"}'),
            '{path}: not a valid JWKS: a JWKS must be an object with a "keys" array',
        ),
    ),
    ("issuer-ca-missing", missing("issuer_ca", 17, "identity.issuers[0].ca")),
    ("signing-key-missing", missing("signing", 19, "signing.key_file")),
    (
        "signing-key-public",
        replaced(
            "signing",
            19,
            "signing.key_file",
            text_file("public.jwk", '{"kty": "EC", "crv": "P-256", "x": "", "y": ""}'),
            "{path}: not a usable signing key: signing key must be a private JWK",
        ),
    ),
    ("previous-key-missing", missing("previous", 20, "signing.previous_key_files[0]")),
    (
        "audit-folder-is-a-file",
        replaced(
            "audit",
            22,
            "audit.file",
            lambda p, t: text_file("afile", "")(p, t) / "audit.jsonl",
            "cannot create {path}: {path.parent} is not a writable folder",
        ),
    ),
    (
        "audit-file-is-a-folder",
        replaced("audit", 22, "audit.file", lambda p, t: t, "{path} is not a regular file"),
    ),
    ("upstream-ca-missing", missing("upstream_ca", 31, "tools[1].upstream.tls.ca")),
    ("upstream-cert-missing", missing("upstream_cert", 31, "tools[1].upstream.tls.cert")),
    (
        "upstream-key-mismatch",
        replaced(
            "upstream_key",
            31,
            "tools[1].upstream.tls.cert",
            lambda p, t: p.broker_key,
            "{path} does not match the certificate {pki}/backend.pem",
        ),
    ),
    ("webhook-ca-missing", missing("webhook_ca", 39, "approvals.webhooks[0].ca")),
]


@pytest.mark.parametrize("breaks", [b for _, b in ROWS], ids=[i for i, _ in ROWS])
def test_each_unusable_file_is_one_problem_at_the_line_naming_it(
    pki: Pki, tmp_path: Path, breaks: Breaks
) -> None:
    files = good_files(pki, tmp_path)
    expected = breaks(files, tmp_path, pki)
    path = write_config(tmp_path, files)
    result = check_config(path, environ={})
    assert [str(p) for p in result.problems] == [f"{path}:{expected}"]
    assert result.loaded is None


def test_a_file_named_in_several_places_is_one_problem_at_the_first(pki: Pki, tmp_path: Path) -> None:
    files = good_files(pki, tmp_path)
    absent = tmp_path / "absent-ca.pem"
    files |= {"client_ca": absent, "issuer_ca": absent, "upstream_ca": absent, "webhook_ca": absent}
    path = write_config(tmp_path, files)
    problems = [str(p) for p in check_config(path, environ={}).problems]
    assert problems == [f"{path}:10: server.tls.client_ca: cannot read {absent}: No such file or directory"]


ONE_PASS = """\
version: 1
server:
  listen: nowhere
  public_url: https://localhost:8443
  tls: {{cert: {cert}, key: {key}, client_ca: {client_ca}}}
identity:
  trust_domain: example.org
  audience: https://broker.example.org
  proof: dpopp
  issuers:
    - {{issuer: https://idp.example.org, jwks_file: {jwks}}}
signing: {{key_file: {signing}}}
audit:
  file: {audit}
  checkpoint_evry: 5
tools:
  - name: listInvoices
    upstrem: {{url: https://127.0.0.1:1/invoices}}
policies:
  - id: readers
    tools: [listInvoices]
    when: has(subject.department) &&
  - id: velocity
    tools: [listInvoices]
    effect: obligate
    requires: [security_review]
    when: counters.approvals_1h.count > 5
"""


def test_models_files_and_cel_are_reported_in_one_pass(pki: Pki, tmp_path: Path) -> None:
    files = good_files(pki, tmp_path) | {"signing": tmp_path / "absent.jwk"}
    path = write_config(tmp_path, files, ONE_PASS)
    lines = [str(p).removeprefix(f"{path}:") for p in check_config(path, environ={}).problems]
    assert lines[:5] == [
        "3: server.listen: expected host:port, got 'nowhere'",
        "9: identity.proof: Input should be 'dpop', 'mtls' or 'either'",
        f"12: signing.key_file: cannot read {tmp_path / 'absent.jwk'}: No such file or directory",
        "15: audit.checkpoint_evry: unknown key; did you mean `checkpoint_every`?",
        "17: tools[0].upstream: required key is missing",
    ]
    assert lines[5] == "18: tools[0].upstrem: unknown key; did you mean `upstream`?"
    assert lines[6].startswith("22: policies[0].when: invalid CEL: ")
    assert lines[7:] == ["27: policies[1].when: unknown counter 'approvals_1h'"]
    assert all("\n" not in line for line in lines)  # one line per problem, CEL's caret drawing left out


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "checkpoint_every: 5",
            "checkpoint_evry: 5",
            "23: audit.checkpoint_evry: unknown key; did you mean `checkpoint_every`?",
        ),
        (
            "    client_ca:",
            "    clientca:",
            "10: server.tls.clientca: unknown key; did you mean `client_ca`?",
        ),
        ("signing:\n", "signin:\n", "18: signin: unknown key; did you mean `signing`?"),
        ("    when: actor", "    wehn: actor", "35: policies[0].wehn: unknown key; did you mean `when`?"),
        ("  webhooks:", "  webhoks:", "37: approvals.webhoks: unknown key; did you mean `webhooks`?"),
        ("checkpoint_every: 5", "zebra: 5", "23: audit.zebra: unknown key"),
    ],
    ids=["audit", "server-tls", "top-level", "policy-item", "approvals", "nothing-close"],
)
def test_an_unknown_key_names_the_nearest_known_one(
    pki: Pki, tmp_path: Path, old: str, new: str, expected: str
) -> None:
    path = write_config(tmp_path, good_files(pki, tmp_path), TEMPLATE.replace(old, new, 1))
    lines = [str(p).removeprefix(f"{path}:") for p in check_config(path, environ={}).problems]
    assert expected in lines


def test_an_unset_variable_is_one_problem_not_also_an_empty_path(pki: Pki, tmp_path: Path) -> None:
    files = good_files(pki, tmp_path)
    text = TEMPLATE.replace("key_file: {signing}", "key_file: ${{NOPE}}/broker-signing.jwk")
    path = write_config(tmp_path, files, text)
    lines = [str(p).removeprefix(f"{path}:") for p in check_config(path, environ={}).problems]
    assert lines == ["19: environment variable NOPE is not set (use ${NOPE:-default} for a default)"]


def test_listen_addresses_remember_the_variable_they_came_from(pki: Pki, tmp_path: Path) -> None:
    text = TEMPLATE.replace("listen: 127.0.0.1:0", "listen: ${{BROKER_LISTEN:-127.0.0.1:0}}", 1)
    result = check_config(write_config(tmp_path, good_files(pki, tmp_path), text), environ={})
    assert result.loaded is not None
    assert result.loaded.variables[("server", "listen")] == ("BROKER_LISTEN",)
    assert ("server", "admin_listen") not in result.loaded.variables
