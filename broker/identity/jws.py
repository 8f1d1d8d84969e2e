"""Strict, cheap parsing of compact JWS (RFC 7515 §7.1), shared by access tokens and DPoP proofs.

Pure: no keys, no clock, no I/O. :func:`parse_compact` turns a compact serialization into a :class:`ParsedJws`
or raises :class:`JwsError` with a precise ``reason``; callers map that to their own BrokerError
(``InvalidToken``, ``InvalidDpopProof``, ...). Signatures are checked afterwards with
:func:`broker.jose.verify_signature` over ``signing_input``: the very bytes the claims came from (J15).

Why each rule (HOSTILE.md §1.1):
- the length cap comes before any decoding, so a 500 MB header costs one ``len()`` (J12);
- compact form only, exactly three segments: no JSON serialization, no 5-segment JWE (J13–J15);
- strict base64url without padding or whitespace (RFC 7515 §2, J13), decoded by a private decoder that accepts
  exactly what :func:`broker.jose.b64url_decode` accepts at a third of its cost (every DPoP proof is new, so
  this parse is on every request's path);
- header and payload are UTF-8 JSON *objects*, parsed with duplicate members refused (RFC 7515 §5.2 allows
  refusing; PyJWT silently takes the last one, J11) and NaN/Infinity refused (not JSON, RFC 8259 §6);
- ``crit`` is refused whenever present: we implement no extension, and RFC 7515 §4.1.11 says a recipient
  that does not understand a listed extension MUST reject; an empty or odd ``crit`` is malformed anyway (J09);
- ``b64`` other than ``true`` (RFC 7797 unencoded payloads) is refused (J10); JWE-only members ``enc``/``zip``
  are refused so nothing downstream is tempted to decrypt or inflate (J14);
- ``alg`` must be a string (J02); whether it is allowed is the caller's decision.
"""

from __future__ import annotations

import binascii
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["REASONS", "JwsError", "ParsedJws", "loads_strict", "parse_compact"]

#: every ``JwsError.reason`` this module raises: a closed set callers map onto their own reasons
REASONS = frozenset(
    {
        "jws_malformed",
        "jws_oversize",
        "jws_segments",
        "jws_b64",
        "jws_json",
        "jws_duplicate_member",
        "jws_crit",
        "jws_b64_false",
        "jws_jwe_header",
        "jws_alg",
    }
)


class JwsError(ValueError):
    """An unacceptable compact JWS; ``reason`` is a stable code (``jws_segments``, ``jws_b64``, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _DuplicateMember(ValueError):
    pass


class _NonFiniteNumber(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ParsedJws:
    """A syntactically valid compact JWS whose signature has NOT been checked yet."""

    header: dict[str, Any]
    payload: dict[str, Any]
    #: ASCII bytes of ``header_b64 + "." + payload_b64`` (RFC 7515 §5.2 step 8)
    signing_input: bytes
    signature: bytes
    header_b64: str
    payload_b64: str


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _DuplicateMember
    return result


def _refuse_constant(name: str) -> Any:
    # json calls this for NaN, Infinity and -Infinity only.
    raise _NonFiniteNumber(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # "1e400" overflows to inf
        raise _NonFiniteNumber(text)
    return value


_DECODER = json.JSONDecoder(
    object_pairs_hook=_object_without_duplicates, parse_constant=_refuse_constant, parse_float=_finite_float
)


def loads_strict(data: bytes) -> Any:
    """Parse UTF-8 JSON with duplicate members and non-finite numbers refused.

    Raises :class:`JwsError` with ``jws_duplicate_member`` or ``jws_json`` (also for invalid UTF-8,
    trailing data, integers past Python's digit limit and nesting deep enough to hit the recursion limit).
    """
    try:
        text = data.decode("utf-8")
        try:
            # Fast path for a value that fills the whole text, as every JOSE encoder emits: the scanner alone,
            # without decode()'s two whitespace passes. Anything else (surrounding whitespace, trailing data,
            # a syntax error) is handed to decode(), whose answer is then the only one that counts.
            value, end = _DECODER.raw_decode(text)
        except json.JSONDecodeError:
            end = -1
        if end != len(text):
            value = _DECODER.decode(text)
        return value
    except _DuplicateMember:
        raise JwsError("jws_duplicate_member") from None
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, non-finite, >4300 digits
        raise JwsError("jws_json") from None


# base64url -> standard alphabet for binascii; "+", "/" and "=" become "!", which strict mode refuses, so the
# only characters that survive are exactly the RFC 7515 §2 alphabet.
_B64URL_TO_STANDARD = bytes.maketrans(b"-_+/=", b"+/!!!")


def _decode_segment(segment: str) -> bytes:
    """Strict base64url without padding (RFC 7515 §2) of an ASCII ``segment``, or ``jws_b64``.

    Same acceptance as :func:`broker.jose.b64url_decode` (checked against it on random input), without its
    per-character alphabet scan: ``a2b_base64(strict_mode=True)`` refuses whitespace, any non-alphabet byte
    and a length of 1 mod 4; the padding added here is always exactly what the length calls for.
    """
    data = segment.encode("ascii").translate(_B64URL_TO_STANDARD)
    try:
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4), strict_mode=True)
    except binascii.Error:
        raise JwsError("jws_b64") from None


def _json_object(segment: str) -> dict[str, Any]:
    value = loads_strict(_decode_segment(segment))
    if not isinstance(value, dict):
        raise JwsError("jws_json")
    return value


def parse_compact(token: str, *, max_bytes: int) -> ParsedJws:
    """Parse a compact JWS strictly; raise :class:`JwsError` on the first problem.

    Reasons: ``jws_oversize``, ``jws_segments``, ``jws_b64``, ``jws_json``, ``jws_duplicate_member``,
    ``jws_crit``, ``jws_b64_false``, ``jws_jwe_header``, ``jws_alg``. The header is inspected before the
    payload is decoded, so a header-level refusal costs no payload work.
    """
    if not isinstance(token, str):
        raise JwsError("jws_malformed")
    # J12: cap first. Non-ASCII characters can never be base64url, so char count == byte count for the rest.
    if len(token) > max_bytes:
        raise JwsError("jws_oversize")
    if not token.isascii():  # also what makes the segments safe to encode as ASCII below
        raise JwsError("jws_b64")
    segments = token.split(".")
    if len(segments) != 3:
        raise JwsError("jws_segments")
    header_b64, payload_b64, signature_b64 = segments

    header = _json_object(header_b64)
    if "b64" in header and header["b64"] is not True:
        raise JwsError("jws_b64_false")
    if "crit" in header:
        raise JwsError("jws_crit")
    if "enc" in header or "zip" in header:
        raise JwsError("jws_jwe_header")
    if not isinstance(header.get("alg"), str):
        raise JwsError("jws_alg")

    payload = _json_object(payload_b64)
    signature = _decode_segment(signature_b64)
    signing_input = token[: len(header_b64) + 1 + len(payload_b64)].encode("ascii")
    return ParsedJws(
        header=header,
        payload=payload,
        signing_input=signing_input,
        signature=signature,
        header_b64=header_b64,
        payload_b64=payload_b64,
    )
