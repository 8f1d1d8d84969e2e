"""``broker connect``'s pure decisions (broker/sdk/connect.py) and the token sources (broker/sdk/credentials.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest
from multidict import CIMultiDict

from broker.dev.idp import mint_access_token
from broker.sdk.connect import (
    downstream_headers,
    forwarded_path,
    local_refusal,
    parse_listen,
    replay_allowed,
    token_scheme,
    upstream_headers,
    whole_answer,
)
from broker.sdk.credentials import (
    MAX_TOKEN_BYTES,
    NO_EXP_REFRESH_SECONDS,
    REFRESH_MARGIN_SECONDS,
    STDERR_LINE_CHARS,
    CommandToken,
    FileToken,
    TokenUnavailable,
    redacted_first_line,
    refresh_due,
    secret_file_problem,
    token_expiry,
)
from tests.certfactory import Pki


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8765", ("127.0.0.1", 8765)),
        ("127.0.0.2:0", ("127.0.0.2", 0)),
        ("[::1]:9000", ("::1", 9000)),
        ("localhost:8765", ("127.0.0.1", 8765)),
    ],
)
def test_loopback_listen_addresses_are_accepted(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text", ["0.0.0.0:8765", "[::]:8765", "192.168.1.4:8765", "example.org:8765", "8765", "127.0.0.1:x"]
)
def test_other_listen_addresses_are_refused_in_one_line(text: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_listen(text)
    assert "\n" not in str(refused.value) and text in str(refused.value)


SECRET = b"s3cret-local-token"


LOCAL = {"Host": "127.0.0.1:8765"}
GOOD = {**LOCAL, "Authorization": "Bearer s3cret-local-token"}


@pytest.mark.parametrize(
    ("method", "headers", "secret", "status"),
    [
        ("POST", LOCAL, None, None),
        ("POST", {"Host": "localhost:8765"}, None, None),
        ("POST", {"Host": "[::1]:8765"}, None, None),
        ("POST", {"Host": "attacker.example:8765"}, None, 403),  # DNS rebinding
        ("POST", {"Host": ""}, None, 403),
        ("POST", {**LOCAL, "Origin": "https://evil.example"}, None, 403),
        ("POST", {**LOCAL, "Origin": "null"}, None, 403),
        # issue 12 C1: another local web app (a dev server, a notebook) is a browser page too
        ("POST", {**GOOD, "Origin": "http://localhost:3000"}, SECRET, 403),
        ("POST", {**GOOD, "Origin": "http://127.0.0.1:8765"}, SECRET, 403),
        ("POST", {**GOOD, "Sec-Fetch-Site": "same-site"}, SECRET, 403),
        ("POST", {**GOOD, "Sec-Fetch-Site": "same-origin"}, SECRET, 403),
        ("POST", {**GOOD, "Sec-Fetch-Site": "cross-site"}, SECRET, 403),
        (
            "GET",
            {**GOOD, "Sec-Fetch-Site": "none"},
            SECRET,
            None,
        ),  # typed in the address bar, with the secret
        ("OPTIONS", GOOD, SECRET, 403),  # a CORS preflight
        ("options", LOCAL, None, 403),
        ("POST", LOCAL, SECRET, 403),
        ("POST", {**LOCAL, "Authorization": "Bearer wrong"}, SECRET, 403),
        ("POST", {**LOCAL, "Authorization": "Basic s3cret-local-token"}, SECRET, 403),
        ("POST", GOOD, SECRET, None),
        ("POST", {**LOCAL, "Authorization": "bearer s3cret-local-token"}, SECRET, None),
    ],
    ids=[
        "ipv4",
        "localhost",
        "ipv6",
        "rebinding-host",
        "no-host",
        "foreign-origin",
        "null-origin",
        "loopback-origin-dev-server",
        "own-origin",
        "same-site-fetch",
        "same-origin-fetch",
        "cross-site-fetch",
        "user-typed-fetch",
        "cors-preflight",
        "options-any-case",
        "secret-missing",
        "secret-wrong",
        "secret-wrong-scheme",
        "secret-right",
        "scheme-case-insensitive",
    ],
)
def test_local_requests(
    method: str, headers: dict[str, str], secret: bytes | None, status: int | None
) -> None:
    refusal = local_refusal(method, CIMultiDict(headers), secret=secret)
    assert (refusal[0] if refusal else None) == status


@pytest.mark.parametrize(
    ("path", "forwarded"),
    [
        ("/mcp/expenses", True),
        ("/v1/tools", True),
        ("/.well-known/oauth-protected-resource", True),
        ("/admin/reload", False),
        ("/approvals/", False),
        ("/mcp", False),
        ("/", False),
    ],
)
def test_only_the_agent_routes_are_forwarded(path: str, forwarded: bool) -> None:
    assert forwarded_path(path) is forwarded


def test_upstream_headers_drop_hop_by_hop_and_credentials_then_add_ours() -> None:
    incoming = CIMultiDict(
        [
            ("Host", "127.0.0.1:8765"),
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Length", "12"),
            ("Upgrade", "websocket"),
            ("Authorization", "Bearer local"),
            ("DPoP", "someone-elses-proof"),
            ("Proxy-Authorization", "x"),
            ("Mcp-Session-Id", "abc"),
            ("Accept", "application/json, text/event-stream"),
        ]
    )
    out = upstream_headers(incoming, authorization="DPoP tok", proof="proof")
    assert dict(out) == {
        "Mcp-Session-Id": "abc",
        "Accept": "application/json, text/event-stream",
        "Accept-Encoding": "identity",
        "Authorization": "DPoP tok",
        "DPoP": "proof",
    }
    assert "DPoP" not in upstream_headers(incoming, authorization="Bearer tok", proof=None)


def test_downstream_headers_keep_the_session_and_drop_the_nonce() -> None:
    incoming = CIMultiDict(
        [
            ("Content-Type", "text/event-stream"),
            ("Mcp-Session-Id", "abc"),
            ("DPoP-Nonce", "n"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "close"),
            ("WWW-Authenticate", 'DPoP error="invalid_token"'),
        ]
    )
    assert dict(downstream_headers(incoming)) == {
        "Content-Type": "text/event-stream",
        "Mcp-Session-Id": "abc",
        "WWW-Authenticate": 'DPoP error="invalid_token"',
    }


@pytest.mark.parametrize(
    ("method", "status", "length", "whole"),
    [
        ("POST", 200, "512", True),  # a JSON answer: headers and body in one write
        ("GET", 403, "0", True),
        ("POST", 200, str(64 * 1024), True),
        ("POST", 200, str(64 * 1024 + 1), False),  # large: streamed
        ("POST", 200, None, False),  # no length (SSE, the MCP GET stream): streamed as it arrives
        ("POST", 200, "12abc", False),
        ("HEAD", 200, "512", False),  # the length of a body that is not sent
        ("GET", 204, "0", False),
        ("GET", 304, "512", False),
    ],
)
def test_only_small_answers_of_known_length_are_relayed_whole(
    method: str, status: int, length: str | None, whole: bool
) -> None:
    headers = CIMultiDict({"Content-Type": "application/json"})
    if length is not None:
        headers["Content-Length"] = length
    assert whole_answer(method, status, headers, 64 * 1024) is whole


def _token(pki: Pki, **binding: str) -> str:
    idp = json.loads(pki.idp_jwk.read_text())
    return mint_access_token(idp, sub="alice", now=time.time(), **binding)  # type: ignore[arg-type]


def test_the_scheme_follows_the_token_binding(pki: Pki) -> None:
    assert token_scheme(_token(pki, cnf_jkt="abc")) == "DPoP"
    assert token_scheme(_token(pki, cnf_x5t="abc")) == "Bearer"
    assert token_scheme(_token(pki, cnf_jkt="a", cnf_x5t="b")) == "DPoP"  # both bindings: send the proof too
    assert token_scheme("opaque") == "DPoP"


@pytest.mark.parametrize(
    ("method", "reached", "allowed"),
    [
        ("POST", False, True),  # never reached the broker: nothing can have run
        ("POST", True, False),  # may have run: never replayed
        ("GET", True, True),
        ("DELETE", True, True),
        ("PATCH", True, False),
    ],
)
def test_replay_after_a_connection_error(method: str, reached: bool, allowed: bool) -> None:
    assert replay_allowed(method, reached_broker=reached) is allowed


def test_refresh_is_due_a_margin_before_exp_or_periodically_without_one() -> None:
    assert not refresh_due(fetched_at=0, exp=1000, now=1000 - REFRESH_MARGIN_SECONDS - 1)
    assert refresh_due(fetched_at=0, exp=1000, now=1000 - REFRESH_MARGIN_SECONDS)
    assert not refresh_due(fetched_at=100, exp=None, now=100 + NO_EXP_REFRESH_SECONDS - 1)
    assert refresh_due(fetched_at=100, exp=None, now=100 + NO_EXP_REFRESH_SECONDS)


def test_token_expiry_reads_exp_without_verifying(pki: Pki) -> None:
    token = _token(pki, cnf_jkt="abc")
    assert token_expiry(token) == int(json.loads(_payload(token))["exp"])
    assert token_expiry("not-a-jwt") is None
    assert token_expiry("a.!!!.c") is None


def _payload(token: str) -> bytes:
    part = token.split(".")[1]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _private(path: Path, text: str) -> Path:
    path.touch(mode=0o600)
    path.write_text(text)
    return path


async def test_a_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = _private(tmp_path / "token", "first\n")
    source = FileToken(path)
    assert await source.token() == "first"
    replacement = _private(tmp_path / "token.new", "second")
    os.replace(replacement, path)  # an atomic rotation: a new inode
    assert await source.token() == "second"
    path.write_text("third!")  # in place, same size as "second"
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert await source.token() == "third!"


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "No such file"), ("", "expected one token"), ("two words", "expected one token")],
    ids=["missing", "empty", "two-words"],
)
async def test_an_unusable_token_file_names_itself(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        _private(path, content)
    with pytest.raises(TokenUnavailable) as refused:
        await FileToken(path).token()
    assert str(path) in str(refused.value) and message in str(refused.value)


@pytest.mark.parametrize(
    ("mode", "refused"),
    [
        (0o600, False),
        (0o400, False),
        (0o700, False),
        (0o640, True),
        (0o604, True),
        (0o620, True),
        (0o644, True),
    ],
    ids=["0600", "0400", "0700", "group-read", "other-read", "group-write", "umask-022"],
)
def test_secret_files_that_group_or_others_can_access_are_refused(mode: int, refused: bool) -> None:
    problem = secret_file_problem(Path("/run/t"), stat.S_IFREG | mode)
    assert (problem is not None) is refused
    if problem is not None:
        assert (
            problem
            == f"/run/t: permissions {mode:04o} are too open (group or others have access); chmod 600 /run/t"
        )


async def test_a_token_file_readable_by_others_is_refused_and_not_read(tmp_path: Path) -> None:
    path = _private(tmp_path / "token", "first\n")
    source = FileToken(path)
    assert await source.token() == "first"
    path.chmod(0o644)  # issue 12 C3: like ssh with a private key, checked on every use
    with pytest.raises(TokenUnavailable) as refused:
        await source.token()
    assert (
        str(refused.value)
        == f"token file {path}: permissions 0644 are too open (group or others have access); chmod 600 {path}"
    )


async def test_a_token_command_runs_once_until_the_token_nears_exp(pki: Pki, tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    token = _token(pki, cnf_jkt="abc")  # exp in an hour: one run serves every request
    (tmp_path / "token").write_text(token)
    source = CommandToken(f"echo x >> {counter}; cat {tmp_path / 'token'}")
    assert await asyncio.gather(*(source.token() for _ in range(5))) == [token] * 5
    assert counter.read_text() == "x\n" and source.runs == 1
    expiring = mint_access_token(
        json.loads(pki.idp_jwk.read_text()), sub="alice", now=time.time(), ttl=30
    )  # inside the refresh margin: every request runs the helper again
    (tmp_path / "token").write_text(expiring)
    source = CommandToken(f"cat {tmp_path / 'token'}")
    await source.token()
    await source.token()
    assert source.runs == 2


async def test_a_failing_token_command_is_one_clear_line_without_its_arguments() -> None:
    source = CommandToken(
        f"{sys.executable} -c 'import sys; sys.stderr.write(\"login expired\\nmore\\n\"); sys.exit(3)'"
        " --client-secret=hunter2-argument"
    )
    with pytest.raises(TokenUnavailable) as refused:
        await source.token()
    # issue 12 C2: the command line (its arguments may be a secret) is never quoted
    assert str(refused.value) == "token command exited with status 3: login expired"


JWT_LIKE = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVzLTEyMzQ1Njc4"


@pytest.mark.parametrize(
    ("stderr", "logged"),
    [
        (b"refresh token revoked\n", "refresh token revoked"),
        (b"\n\n  login expired  \nsecond line\n", "login expired"),
        (f"got {JWT_LIKE} back\n".encode(), "got [redacted].[redacted].[redacted] back"),
        (b"curl: Authorization: Bearer abc.def rejected", "curl: Authorization: Bearer [redacted] rejected"),
        (b"bad client_secret=hunter2 for app", "bad client_secret=[redacted] for app"),
        (b"password: hunter2", "password: [redacted]"),
        (b"key 0123456789abcdef0123456789abcdef unknown", "key [redacted] unknown"),
        (b"error\x1b[31m red", "error?[31m red"),
        (b"", ""),
        (b"x" * 1000, "x" * (STDERR_LINE_CHARS - 1) + "\u2026"),
    ],
    ids=[
        "plain",
        "first-non-empty",
        "jwt",
        "scheme",
        "assignment",
        "colon",
        "hex-key",
        "control",
        "none",
        "capped",
    ],
)
def test_a_helper_stderr_line_is_redacted_and_capped(stderr: bytes, logged: str) -> None:
    assert redacted_first_line(stderr) == logged


async def test_a_token_command_output_is_read_with_a_cap() -> None:
    source = CommandToken(
        "yes", timeout=20
    )  # endless output: refused at the cap, not buffered until a timeout
    with pytest.raises(TokenUnavailable) as refused:
        await source.token()
    assert str(refused.value) == f"token command: more than {MAX_TOKEN_BYTES} bytes on stdout, not a token"


async def test_a_refused_token_command_leaves_no_pipe_open() -> None:
    # a burst larger than the stream's buffer pauses the pipe's reading at once; the helper then waits to be
    # killed. Its unread rest must still be read to the end, or the pipe stays open: an fd lost per refused run
    burst = (
        f"{sys.executable} -c 'import fcntl, sys, time; fcntl.fcntl(1, fcntl.F_SETPIPE_SZ, 1 << 20);"
        ' sys.stdout.write("x" * (1 << 20)); sys.stdout.flush(); time.sleep(60)\''
    )
    open_fds = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(TokenUnavailable, match="more than"):
            await CommandToken(burst, timeout=20).token()
    assert len(os.listdir("/proc/self/fd")) == open_fds


async def test_a_token_command_flooding_stderr_is_drained_not_kept() -> None:
    flood = (
        f'{sys.executable} -c \'import sys; sys.stderr.write("first\\n" + "e" * 10_000_000); sys.exit(5)\''
    )
    with pytest.raises(TokenUnavailable) as refused:
        await CommandToken(flood).token()
    assert str(refused.value) == "token command exited with status 5: first"
