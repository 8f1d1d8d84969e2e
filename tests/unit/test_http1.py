"""The upstream HTTP/1.1 parser (broker.gateway.http1), without sockets: heads and chunked bodies, and every
framing a desynchronising backend could try (HOSTILE P02 — response smuggling), refused."""

from __future__ import annotations

import pytest
from yarl import URL

from broker.errors import UpstreamError
from broker.gateway.http1 import MAX_CHUNKS, MAX_HEADERS, Chunked, parse_head, request_bytes


def head(*lines: str, status: str = "HTTP/1.1 200 OK") -> bytes:
    return "\r\n".join([status, *lines]).encode("latin-1")


def test_a_plain_answer() -> None:
    parsed = parse_head(head("Content-Type: application/json; charset=utf-8", "Content-Length:  12 "))
    assert (parsed.status, parsed.http11, parsed.length, parsed.chunked, parsed.close) == (
        200,
        True,
        12,
        False,
        False,
    )
    assert parsed.get("content-type") == "application/json; charset=utf-8"


@pytest.mark.parametrize(
    ("lines", "status", "close"),
    [
        ((), "HTTP/1.1 204 No Content", False),
        (("Connection: close",), "HTTP/1.1 200 OK", True),
        (("Connection: keep-alive, Close",), "HTTP/1.1 200 OK", True),
        ((), "HTTP/1.0 200 OK", True),  # HTTP/1.0: the connection ends with the answer
        ((), "HTTP/1.1 200", False),  # no reason phrase
        ((), "HTTP/1.1 404 ", False),
    ],
)
def test_connection_persistence(lines: tuple[str, ...], status: str, close: bool) -> None:
    assert parse_head(head(*lines, status=status)).close is close


def test_chunked_and_repeated_equal_lengths() -> None:
    assert parse_head(head("Transfer-Encoding: Chunked")).chunked
    assert parse_head(head("Content-Length: 5", "Content-Length: 5")).length == 5
    assert parse_head(head("Content-Length: 5, 5")).length == 5


@pytest.mark.parametrize(
    "raw",
    [
        head("Content-Length: 5", "Transfer-Encoding: chunked"),  # CL.TE / TE.CL smuggling
        head("Transfer-Encoding: gzip, chunked"),
        head("Transfer-Encoding: chunked", "Transfer-Encoding: chunked"),
        head("Transfer-Encoding: identity"),
        head("Content-Length: 5", "Content-Length: 6"),
        head("Content-Length: 5, 6"),
        head("Content-Length: -1"),
        head("Content-Length: +5"),
        head("Content-Length: 0x10"),
        head("Content-Length: "),
        head("Content-Length: 99999999999999999999"),
        head("Content-Length : 5"),  # whitespace before the colon
        head("Content-Type: a", " folded"),  # obsolete line folding
        head("Content-Type: a", "\tfolded"),
        head("No colon here"),
        head(": no name"),
        head("X-Nul: a\x00b"),
        head("X-Cr: a\rb"),
        head("X-Lf: a\nb"),
        head("X-Lf: a\n"),
        head("X-Cr-End: a\r"),
        head("Bad Name: x"),
        head(status="HTTP/2 200 OK"),
        head(status="HTTP/1.1 2000 OK"),
        head(status="HTTP/1.1 20 OK"),
        head(status="HTTP/1.1  200 OK"),
        head(status="HTTP/1.1 200OK"),
        head(status="ICY 200 OK"),
        head(status="HTTP/1.2 200 OK"),
        head(status="HTTP/1.1 099 Early"),  # below 100: not a status
        head(status="HTTP/1.1 000 Nothing"),
        head(status="HTTP/1.1 200 O\nK"),  # a bare LF in the reason phrase
        head(status="HTTP/1.1 200 O\x00K"),
        head(*[f"X-{i}: y" for i in range(MAX_HEADERS + 1)]),
    ],
    ids=lambda raw: raw.decode("latin-1").replace("\r\n", " | ")[:60],
)
def test_malformed_heads_are_refused(raw: bytes) -> None:
    with pytest.raises(UpstreamError) as refused:
        parse_head(raw)
    assert refused.value.reason == "upstream_protocol_error"


def decode(data: bytes, limit: int = 1 << 20, *, bytewise: bool = False) -> tuple[bytes, bytearray]:
    """Decode ``data`` fed at once or a byte at a time; (body, what is left after the chunked body)."""
    decoder, buffer = Chunked(limit), bytearray()
    pieces = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    done = False
    for piece in pieces:
        assert not done, "bytes fed after the end"
        buffer += piece
        done = decoder.step(buffer)
    assert done, "the body did not end"
    return bytes(decoder.body), buffer


@pytest.mark.parametrize("bytewise", [False, True])
def test_chunked_bodies(bytewise: bool) -> None:
    assert decode(b"5\r\nhello\r\n0\r\n\r\n", bytewise=bytewise) == (b"hello", bytearray())
    extension = b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    assert decode(extension, bytewise=bytewise)[0] == b"hello world"
    assert decode(b"A\r\n0123456789\r\n0\r\n\r\n", bytewise=bytewise)[0] == b"0123456789"


def test_a_chunked_body_ends_where_it_ends() -> None:
    # what follows the last chunk is not part of this answer: it stays in the buffer (the pool then drops the
    # connection, never reading it as the next answer)
    body, rest = decode(b"2\r\nok\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert (body, bytes(rest)) == (b"ok", b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize(
    "data",
    [
        b"x\r\n",  # not hex
        b"-5\r\n",
        b"\r\n",  # empty size
        b"5\r\nhelloX\r\n",  # data not followed by CRLF
        b"11111111111111111\r\n",  # 17 hex digits
        b"5 5\r\n",
        b"5;a\nb\r\n",  # a bare LF inside an extension (HOSTILE P04)
        b"5;a\x00\r\n",
        b"0\r\nX-Trailer: a\x00b\r\n\r\n",  # a NUL in a trailer field
        b"0\r\nX-Trailer: a\nb\r\n\r\n",
    ],
)
def test_malformed_chunks_are_refused(data: bytes) -> None:
    with pytest.raises(UpstreamError) as refused:
        Chunked(1 << 20).step(bytearray(data))
    assert refused.value.reason == "upstream_protocol_error"


def test_chunked_bodies_are_bounded() -> None:
    with pytest.raises(UpstreamError) as refused:  # refused at the size line, before the data arrives
        Chunked(10).step(bytearray(b"B\r\n"))
    assert refused.value.reason == "upstream_too_large"
    decoder = Chunked(10)
    with pytest.raises(UpstreamError):
        decoder.step(bytearray(b"5\r\nhello\r\n6\r\n"))
    with pytest.raises(UpstreamError) as long_line:  # a size line that never ends
        Chunked(10).step(bytearray(b"1" + b";" * 2000))
    assert long_line.value.reason == "upstream_protocol_error"


def test_the_request_is_exactly_what_the_broker_built() -> None:
    raw = request_bytes(URL("https://[::1]:9443/invoices?x=1"), b"{}", {"Content-Type": "application/json"})
    assert raw == (
        b"POST /invoices?x=1 HTTP/1.1\r\nHost: [::1]:9443\r\nContent-Length: 2\r\n"
        b"Content-Type: application/json\r\n\r\n{}"
    )
    assert b"Host: backend.example\r\n" in request_bytes(URL("https://backend.example/a"), b"", {})
    with pytest.raises(ValueError):
        request_bytes(URL("https://b/a"), b"", {"X-Evil": "a\r\nInjected: yes"})


def test_a_body_in_too_many_chunks_is_refused() -> None:
    decoder = Chunked(1 << 30)
    with pytest.raises(UpstreamError) as refused:
        decoder.step(bytearray(b"1\r\nx\r\n" * (MAX_CHUNKS + 1)))
    assert refused.value.reason == "upstream_protocol_error"
