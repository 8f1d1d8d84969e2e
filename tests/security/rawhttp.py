"""Raw HTTP/1.1 over real TLS: write exact bytes to the broker and read what comes back.

aiohttp's client normalises what it sends (framing, header folding, paths); smuggling and path-confusion rows
(HOSTILE P01–P05, P11, P12) need the exact bytes on the wire, so these helpers open a TLS connection with
:mod:`ssl` and write them verbatim.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*")

#: how long a raw exchange may take before we stop reading (a server that neither answers nor closes)
DEFAULT_DEADLINE_SECONDS = 5.0


@dataclass
class RawReply:
    data: bytes
    #: the server closed the connection (EOF or reset) before the deadline
    closed: bool

    @property
    def responses(self) -> list[RawResponse]:
        """The responses in the reply stream, framed by their ``Content-Length`` (a response without one
        runs to the end of the stream)."""
        found: list[RawResponse] = []
        rest = self.data
        while rest:
            match = _STATUS_LINE.match(rest)
            head, sep, after = rest.partition(b"\r\n\r\n")
            if match is None or not sep:
                break
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
            length = int(headers["content-length"]) if "content-length" in headers else len(after)
            if len(after) < length:
                break  # not complete yet
            found.append(RawResponse(int(match.group(1)), headers, after[:length]))
            rest = after[length:]
        return found

    @property
    def statuses(self) -> list[int]:
        """The status of every response (two means the server answered two requests)."""
        return [response.status for response in self.responses]

    @property
    def status(self) -> int | None:
        statuses = self.statuses
        return statuses[0] if statuses else None

    @property
    def body(self) -> bytes:
        """The body of the first response."""
        responses = self.responses
        return responses[0].body if responses else b""


@dataclass
class RawResponse:
    status: int
    #: header names lowercased; a repeated header keeps its last value
    headers: dict[str, str]
    body: bytes


def request(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: bytes = b"",
    *,
    host: str = "localhost",
    content_length: bool = True,
) -> bytes:
    """One well-formed request (``Host`` first, then ``headers``, then ``Content-Length`` if asked)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if content_length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def exchange(
    port: int,
    context: ssl.SSLContext | None,
    data: bytes | Sequence[bytes],
    *,
    deadline: float = DEFAULT_DEADLINE_SECONDS,
    responses: int | None = None,
    pause: float = 0.0,
) -> RawReply:
    """Write ``data`` (one buffer, or several written one after the other) and read until the server closes
    the connection, ``responses`` complete responses have arrived (when given), or ``deadline`` seconds pass;
    ``pause`` seconds between the buffers (so that the server has parsed one before the next arrives).
    Never raises for a refused or reset connection. ``context=None``: plain HTTP (the admin listener)."""
    if context is None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    else:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost"
        )
    chunks: list[bytes] = []
    closed = False
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    try:
        for index, part in enumerate([data] if isinstance(data, bytes) else data):
            if index and pause:
                await asyncio.sleep(pause)
            writer.write(part)
            await writer.drain()
        while True:
            remaining = end - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    chunk = await reader.read(65536)
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
            if responses is not None and len(RawReply(b"".join(chunks), False).responses) >= responses:
                break
    except (ConnectionError, ssl.SSLError):
        closed = True
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    return RawReply(b"".join(chunks), closed)
