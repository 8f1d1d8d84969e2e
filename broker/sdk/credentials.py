"""Where an agent's access token comes from: a fixed value, a file that rotates, or a credential helper.

Shared by :class:`broker.sdk.agent.AgentClient` and ``broker connect`` (:mod:`broker.sdk.connect`). Each source
answers ``await source.token()`` with the token to send now:

- :class:`StaticToken` — the value given;
- :class:`FileToken` — the file's content, re-read whenever its (inode, size, mtime) changes, so a rotation
  written by another process (atomically or in place) is picked up on the next request; a file that group or
  others can access is refused (like ssh with a private key);
- :class:`CommandToken` — the stdout of a shell command (like git's credential helpers or kubectl's exec
  plugins), run again ``REFRESH_MARGIN_SECONDS`` before the token's ``exp`` (read, not verified: the broker
  verifies it), or every ``NO_EXP_REFRESH_SECONDS`` when the token has no ``exp``. Its output is read with a cap.

Failures are :class:`TokenUnavailable` with one line naming the file (never the command line: its arguments may
carry a secret). :func:`refresh_due`, :func:`token_expiry`, :func:`secret_file_problem` and
:func:`redacted_first_line` are the pure decisions.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import stat
import time
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "CommandToken",
    "FileToken",
    "StaticToken",
    "TokenSource",
    "TokenUnavailable",
    "redacted_first_line",
    "refresh_due",
    "secret_file_problem",
    "token_expiry",
    "unverified_claims",
]

#: run the command again this long before the token expires (a call in flight must not outlive it)
REFRESH_MARGIN_SECONDS = 60
#: a token without ``exp`` (opaque, or a JWT without one) is fetched again this often
NO_EXP_REFRESH_SECONDS = 300
#: a credential helper that takes longer than this is a failure, not a hung request
COMMAND_TIMEOUT_SECONDS = 30.0
#: CONTRACT §8: the broker refuses tokens over 8 KiB; a larger file or output is a mistake, not a token
MAX_TOKEN_BYTES = 8192
#: of a failing helper's stderr, this much is read and kept (the rest is drained and dropped) ...
STDERR_KEEP_BYTES = 4096
#: ... and this many characters of its first line are logged
STDERR_LINE_CHARS = 200
_READ_CHUNK = 65536


class TokenUnavailable(Exception):
    """No token could be obtained; the message is one line naming the file or command and why."""


class TokenSource(Protocol):
    async def token(self) -> str: ...


class StaticToken:
    """A token given once (``AgentClient(access_token=...)``)."""

    def __init__(self, value: str) -> None:
        self.value = value

    async def token(self) -> str:
        return self.value


def secret_file_problem(path: Path, mode: int) -> str | None:
    """Why a secret file with this ``st_mode`` must not be used (group or others have access), or None."""
    if mode & 0o077:
        return (
            f"{path}: permissions {stat.S_IMODE(mode):04o} are too open (group or others have access); "
            f"chmod 600 {path}"
        )
    return None


# a credential in a helper's message: a long run of token characters with a digit in it (JWT parts, API keys,
# hex), an authorization scheme's value, or the value of a password/secret/token/key assignment
_LONG_RUN = re.compile(r"[A-Za-z0-9_~+=-]{20,}")
_SCHEME_VALUE = re.compile(r"(?i)\b(bearer|basic|dpop)\s+\S+")
_ASSIGNMENT = re.compile(r"(?i)\b([\w-]*(?:password|passwd|secret|token|key|credential)s?)(\s*[=:]\s*)\S+")
REDACTED = "[redacted]"


def redacted_first_line(stderr: bytes) -> str:
    """The first non-empty line of a helper's stderr, fit for a log: anything shaped like a credential replaced
    by ``[redacted]``, other control characters by ``?``, at most ``STDERR_LINE_CHARS`` characters ("" if none)."""
    lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    if not lines:
        return ""
    line = "".join(c if c.isprintable() else "?" for c in lines[0].strip())
    line = _SCHEME_VALUE.sub(lambda m: f"{m.group(1)} {REDACTED}", line)
    line = _ASSIGNMENT.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", line)
    line = _LONG_RUN.sub(lambda m: REDACTED if re.search(r"\d", m.group()) else m.group(), line)
    return line if len(line) <= STDERR_LINE_CHARS else line[: STDERR_LINE_CHARS - 1] + "…"


def _clean(raw: bytes, origin: str) -> str:
    if len(raw) > MAX_TOKEN_BYTES:
        raise TokenUnavailable(f"{origin}: more than {MAX_TOKEN_BYTES} bytes, not a token")
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise TokenUnavailable(f"{origin}: not ASCII, not a token") from None
    if not text or any(c.isspace() for c in text):
        raise TokenUnavailable(
            f"{origin}: expected one token (no spaces or lines), got {len(text)} characters"
        )
    return text


class FileToken:
    """The token in ``path``; re-read when the file's (inode, size, mtime_ns) change (one ``stat`` a request).

    A file that group or others can access is :class:`TokenUnavailable` (checked on every request)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int, int] | None = None
        self._value = ""

    async def token(self) -> str:
        try:
            st = os.stat(self.path)
            self._refuse_open(st.st_mode)
            if (st.st_ino, st.st_size, st.st_mtime_ns) != self._seen:
                with self.path.open("rb") as file:  # the mode and stamp of what is read, not of the path
                    st = os.fstat(file.fileno())
                    self._refuse_open(st.st_mode)
                    value = _clean(file.read(MAX_TOKEN_BYTES + 1), f"token file {self.path}")
                self._seen, self._value = (st.st_ino, st.st_size, st.st_mtime_ns), value
        except OSError as exc:
            raise TokenUnavailable(f"token file {self.path}: {exc.strerror or exc}") from exc
        return self._value

    def _refuse_open(self, mode: int) -> None:
        problem = secret_file_problem(self.path, mode)
        if problem is not None:
            raise TokenUnavailable(f"token file {problem}")


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a compact JWS, read without verification ({} for an opaque token).

    Only for choices the client makes about its own token (when to refresh it, which scheme it needs);
    the broker verifies the token.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def token_expiry(token: str) -> int | None:
    """The ``exp`` of a JWT (read without verification), or None for an opaque token or one without it."""
    exp = unverified_claims(token).get("exp")
    return exp if isinstance(exp, int) and not isinstance(exp, bool) else None


def refresh_due(*, fetched_at: float, exp: int | None, now: float) -> bool:
    """Whether a token fetched at ``fetched_at`` with expiry ``exp`` must be fetched again at ``now``."""
    if exp is None:
        return now - fetched_at >= NO_EXP_REFRESH_SECONDS
    return now >= exp - REFRESH_MARGIN_SECONDS


class CommandToken:
    """The stdout of ``command`` (run by ``/bin/sh -c``), cached until :func:`refresh_due`.

    Concurrent requests share one run. A non-zero exit, a timeout, an empty output or one over
    ``MAX_TOKEN_BYTES`` is :class:`TokenUnavailable` with the exit status and the first line of its stderr,
    redacted (:func:`redacted_first_line`), never the command line.
    """

    def __init__(self, command: str, *, timeout: float = COMMAND_TIMEOUT_SECONDS) -> None:
        self.command = command
        self.timeout = timeout
        self._value: str | None = None
        self._exp: int | None = None
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()
        #: how many times the command ran (observable by tests and logs)
        self.runs = 0

    async def token(self) -> str:
        if self._value is not None and not refresh_due(
            fetched_at=self._fetched_at, exp=self._exp, now=time.time()
        ):
            return self._value
        async with self._lock:  # a second waiter finds the fresh value
            now = time.time()
            if self._value is None or refresh_due(fetched_at=self._fetched_at, exp=self._exp, now=now):
                self._value = await self._run()
                self._exp, self._fetched_at = token_expiry(self._value), now
            return self._value

    async def _run(self) -> str:
        self.runs += 1
        process = await asyncio.create_subprocess_shell(
            self.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group: what it started dies with it (see below)
        )
        assert process.stdout is not None and process.stderr is not None
        stderr = asyncio.ensure_future(_read_capped(process.stderr, STDERR_KEEP_BYTES, drain=True))
        try:
            async with asyncio.timeout(self.timeout):
                out, too_long = await _read_capped(process.stdout, MAX_TOKEN_BYTES, drain=False)
                if too_long:
                    raise TokenUnavailable(
                        f"token command: more than {MAX_TOKEN_BYTES} bytes on stdout, not a token"
                    )
                err, _ = await stderr
                status = await process.wait()
        except TimeoutError:
            raise TokenUnavailable(f"token command: no answer within {self.timeout:g} s") from None
        finally:
            stderr.cancel()
            if process.returncode is None:
                # the whole group: a shell that did not exec its command would die alone, leaving the command
                # holding the pipes (and waiting on them); a helper that exited is left alone with its children
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            await asyncio.wait([stderr])  # its cancellation has landed: nobody else reads the pipe now
            # both pipes read to their end, so their transports close (a pipe left unread stays open, an fd
            # lost per refused run); bounded: a child the kernel cannot reap yet (uninterruptible sleep), or one
            # that left the group holding a pipe, must not hold the token's lock, and every request waiting on
            # it, for ever
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KILL_WAIT_SECONDS):
                    await asyncio.gather(
                        process.wait(),
                        _read_capped(process.stdout, 0, drain=True),
                        _read_capped(process.stderr, 0, drain=True),
                    )
        if status != 0:
            # the command line is never quoted (its arguments may carry a secret); its stderr only redacted
            first = redacted_first_line(err)
            raise TokenUnavailable(
                f"token command exited with status {status}" + (f": {first}" if first else "")
            )
        return _clean(out, "token command output")


#: how long a killed token command is waited for before it is left to the system
KILL_WAIT_SECONDS = 5.0


async def _read_capped(stream: asyncio.StreamReader, cap: int, *, drain: bool) -> tuple[bytes, bool]:
    """Up to ``cap`` bytes of ``stream`` and whether it had more. Past the cap, ``drain`` reads the rest to EOF
    and drops it (the writer never blocks on a full pipe); otherwise it stops there. Memory stays bounded."""
    kept = bytearray()
    over = False
    while chunk := await stream.read(_READ_CHUNK):
        room = cap - len(kept)
        if len(chunk) > room:
            over = True
            kept += chunk[: max(room, 0)]
            if not drain:
                break
        else:
            kept += chunk
    return bytes(kept), over
