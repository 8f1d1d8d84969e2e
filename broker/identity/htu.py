"""The DPoP ``htu`` comparison form of a URL (RFC 9449 §4.3 check 9, RFC 3986 §6.2.2-§6.2.3).

:func:`normalize_url` maps a URL to the one string we compare, or raises :class:`ValueError`:

- scheme and host are lowercased (§6.2.2.1); only ``http`` and ``https`` are accepted;
- percent-encodings of unreserved characters are decoded (``%7E`` -> ``~``, §6.2.2.2) and every other
  percent-encoding gets uppercase hex (``%2f`` -> ``%2F``); ``%2F`` is never turned into ``/``
  (HOSTILE D09d: a decoded slash changes the path structure a router sees);
- the default port is dropped (``https:443``, ``http:80``) and an empty path becomes ``/`` (§6.2.3);
- the query and the fragment are removed (RFC 9449 §4.3: htu is compared "without query and fragment");
- nothing else is rewritten: dot segments (``.``/``..``, also as ``%2E``) and empty segments (``//``) are
  **refused**, not resolved, because resolving them here while routing resolves them differently is the
  classic path-confusion bypass (HOSTILE D09d, Istio CVE-2021-31920). The path stays case-sensitive and a
  trailing slash stays significant (D09b). Userinfo, raw non-ASCII, whitespace and control characters are
  refused too.

The function is idempotent: ``normalize_url(normalize_url(u)) == normalize_url(u)`` (property-tested), which
lets callers compare a claimed htu with an already-normalised expected one by plain equality first.

:func:`expected_htu` builds the htu the broker expects from the **configured** public base URL and the raw
request path, never from ``Host`` or ``X-Forwarded-*`` (HOSTILE D10, keycloak/keycloak#39332).
"""

from __future__ import annotations

import re

#: a URL longer than this is refused outright (proofs are capped at a few KiB anyway)
MAX_URL_CHARS = 8192

_DEFAULT_PORTS = {"http": "80", "https": "443"}
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")

# RFC 3986 appendix B, restricted to the hierarchical "scheme://authority" form every htu has.
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^?#]*)(?:\?[^#]*)?(?:#.*)?", re.DOTALL)
# The whole URL may only use RFC 3986 characters: unreserved, gen-delims, sub-delims and '%'.
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*")
# path-abempty = *( "/" segment ), segment = *pchar (RFC 3986 §3.3)
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")
_REG_NAME = re.compile(r"[a-z0-9\-._~]+")  # no percent-encoding or sub-delims in host names we serve
_IP_LITERAL = re.compile(r"\[[0-9a-f:.]+\]")
_PORT = re.compile(r"[0-9]{0,5}")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _normalize_pct(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def _normalize_authority(scheme: str, authority: str) -> str:
    if "@" in authority:
        raise ValueError("userinfo is not allowed in a URL")
    authority = authority.lower()
    if authority.startswith("["):
        end = authority.find("]") + 1
        host, rest = authority[:end], authority[end:]
        if not _IP_LITERAL.fullmatch(host):
            raise ValueError("bad IP literal")
    else:
        host, _, port_part = authority.partition(":")
        rest = ":" + port_part if ":" in authority else ""
        if not _REG_NAME.fullmatch(host):
            raise ValueError("bad host")
    if rest and not rest.startswith(":"):
        raise ValueError("bad authority")
    port = rest[1:]
    if not _PORT.fullmatch(port):
        raise ValueError("bad port")
    if port:
        number = int(port)
        if number > 65535:
            raise ValueError("port out of range")
        port = str(number)
    # RFC 3986 §6.2.3: an empty port and the scheme's default port are both omitted.
    if not port or port == _DEFAULT_PORTS[scheme]:
        return host
    return f"{host}:{port}"


def _normalize_path(path: str) -> str:
    if not _PATH_CHARS.fullmatch(path):
        raise ValueError("path has characters outside RFC 3986 pchar")
    if _BAD_PCT.search(path):
        raise ValueError("malformed percent-encoding")
    path = _PCT.sub(_normalize_pct, path)
    if not path:
        return "/"
    segments = path.split("/")[1:]  # path-abempty starts with "/", so element 0 is always ""
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if segment in (".", ".."):
            raise ValueError("dot segments are refused, not resolved")
        if not segment and index != last:
            raise ValueError("empty path segment ('//') is refused")
    return path


def normalize_url(url: str) -> str:
    """The RFC 3986 §6.2.2/§6.2.3 normal form of an http(s) URL without query and fragment.

    Raises :class:`ValueError` for anything that is not an absolute http(s) URL we can compare safely
    (see the module docstring for the exact rules).
    """
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise ValueError("not a URL of acceptable size")
    if not _URL_CHARS.fullmatch(url):
        raise ValueError("URL has characters outside RFC 3986")
    match = _URL.fullmatch(url)
    if match is None:
        raise ValueError("not an absolute URL with an authority")
    scheme = match.group(1).lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("scheme must be http or https")
    authority = _normalize_authority(scheme, match.group(2))
    return f"{scheme}://{authority}{_normalize_path(match.group(3))}"


def expected_htu(public_url: str, request_path: str) -> str:
    """The normalised htu for a request: the configured public base URL joined with the raw request path.

    ``public_url`` is ``server.public_url`` (it may carry a path prefix, e.g. ``https://gw.example/broker``,
    for a broker mounted below a path by a prefix-stripping proxy; it must not carry a query or fragment).
    ``request_path`` is the raw request target as received (aiohttp ``request.raw_path``); its query and
    fragment are dropped. An origin-form target is required: absolute-form (``http://host/x``) and ``*`` are
    refused, so a client can never choose the host part (HOSTILE D10). Raises :class:`ValueError` when either
    part cannot be normalised (callers refuse such a request).
    """
    if "?" in public_url or "#" in public_url:
        raise ValueError("public_url must not have a query or fragment")
    base = normalize_url(public_url)
    path = request_path.partition("?")[0].partition("#")[0]
    if not path.startswith("/"):
        raise ValueError("request target must be in origin form")
    origin_end = base.index("/", len(base.partition("://")[0]) + 3)
    prefix = base[origin_end:].rstrip("/")
    return normalize_url(base[:origin_end] + prefix + path)
