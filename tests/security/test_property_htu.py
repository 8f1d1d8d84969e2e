"""Property-based tests of DPoP ``htu`` normalisation (broker.identity.htu), RFC 9449 §4.3 / RFC 3986 §6.2.

A URL is generated from parts (scheme, host, port, path segments, query, fragment); the properties say which
rewrites must leave its normal form unchanged (HOSTILE D09a query/fragment, D09c case and default port, D09d
unreserved percent-encodings) and which must change it (D09b trailing slash, D09d path case and ``%2F``, D09e host
and port), plus the shape of every normal form and the totality of the function on arbitrary text.
"""

from __future__ import annotations

import contextlib
import re

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from broker.identity.htu import expected_htu, normalize_url

SETTINGS = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
SUB_DELIMS = "!$&'()*+,;=:@"
# a path segment: unreserved and sub-delims, never "." or ".." alone (those are refused, not resolved)
segments = st.text(UNRESERVED + SUB_DELIMS, min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))
paths = st.lists(segments, max_size=5).map(lambda parts: "".join("/" + p for p in parts))
hosts = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True)
schemes = st.sampled_from(["http", "https"])
ports = st.integers(min_value=1, max_value=65535)
queries = st.sampled_from(["", "?", "?q=1", "?a=b&c=%2F", "?x#y", "#frag", "#", "?%zz-not-checked"])


def url(scheme: str, host: str, port: int | None, path: str, tail: str = "") -> str:
    return f"{scheme}://{host}{'' if port is None else f':{port}'}{path}{tail}"


def _random_case(text: str, flips: list[bool]) -> str:
    return "".join(
        c.upper() if flip else c for c, flip in zip(text, flips + [False] * len(text), strict=False)
    )


def _encode_some(path: str, picks: list[bool]) -> str:
    """Percent-encode some unreserved characters of ``path`` (any hex case): the same URL (RFC 3986 §6.2.2.2)."""
    out = []
    for char, pick in zip(path, picks + [False] * len(path), strict=False):
        if pick and char in UNRESERVED:
            encoded = f"%{ord(char):02X}"
            out.append(encoded.lower() if ord(char) % 2 else encoded)
        else:
            out.append(char)
    return "".join(out)


@SETTINGS
@given(schemes, hosts, st.none() | ports, paths, queries, st.lists(st.booleans(), max_size=40))
def test_d09a_d09c_d09d_equivalent_spellings_share_one_normal_form(
    scheme: str, host: str, port: int | None, path: str, tail: str, flips: list[bool]
) -> None:
    base = normalize_url(url(scheme, host, port, path))
    default = {"http": 80, "https": 443}[scheme]
    variants = [
        url(scheme, host, port, path, tail),  # D09a: query and fragment ignored
        url(_random_case(scheme, flips), _random_case(host, flips[::-1]), port, path),  # D09c: case
        url(scheme, host, port, _encode_some(path, flips)),  # D09d: %7E == ~
    ]
    if port is None or port == default:
        variants += [url(scheme, host, default, path), url(scheme, host, None, path)]  # D09c: default port
    for variant in variants:
        assert normalize_url(variant) == base, variant


@SETTINGS
@given(schemes, hosts, st.none() | ports, paths, st.data())
def test_d09b_d09d_d09e_meaningful_differences_survive(
    scheme: str, host: str, port: int | None, path: str, data: st.DataObject
) -> None:
    base = normalize_url(url(scheme, host, port, path))
    different = [
        url(scheme, host, port, path + "/x%2Fy"),  # D09d: %2F is not "/"
        url(scheme, host + "x", port, path),  # D09e: another host
        url(scheme, host, (port or 443) % 65535 + 1, path),  # D09e: another port
        url("http" if scheme == "https" else "https", host, port, path),  # another scheme
    ]
    if path:  # D09b: a trailing slash is significant (an empty path is "/" itself, RFC 3986 §6.2.3)
        different.append(url(scheme, host, port, path + "/"))
    letters = [i for i, c in enumerate(path) if c.isalpha() and c.lower() != c.upper()]
    if letters:  # D09d: the path is case-sensitive
        i = data.draw(st.sampled_from(letters))
        different.append(url(scheme, host, port, path[:i] + path[i].swapcase() + path[i + 1 :]))
    for variant in different:
        assume(variant != url(scheme, host, port, path))
        with contextlib.suppress(ValueError):  # refusing is also different (an out-of-range port, ...)
            assert normalize_url(variant) != base, variant


@SETTINGS
@given(
    st.one_of(st.text(max_size=80), st.text(UNRESERVED + SUB_DELIMS + "%/:?#[]@ \t\r\n\x00é", max_size=80))
)
def test_d09_normalize_url_is_total_and_its_normal_forms_are_canonical(text: str) -> None:
    for candidate in (text, "https://" + text, "https://rs.example/" + text):
        try:
            normal = normalize_url(candidate)
        except ValueError:
            continue
        assert normalize_url(normal) == normal
        match = re.fullmatch(r"(https?)://([^/?#@]+)(/[^?#]*)", normal)
        assert match is not None, normal
        scheme, authority, path = match.groups()
        assert authority == authority.lower()
        assert not authority.endswith((":80", ":443")) or (scheme, authority[-3:]) == ("https", ":80")
        assert "//" not in path and "/./" not in path + "/" and "/../" not in path + "/"
        assert not re.search(r"%(?![0-9A-F]{2})", path)  # every percent-encoding is well formed, upper hex
        decoded_unreserved = re.findall(r"%([0-9A-F]{2})", path)
        assert not any(chr(int(h, 16)) in UNRESERVED for h in decoded_unreserved)


@SETTINGS
@given(paths, queries, hosts)
def test_d10_expected_htu_depends_only_on_the_configured_base_and_the_path(
    path: str, tail: str, host_header: str
) -> None:
    """No Host or X-Forwarded-* can enter: the expected htu is the configured base URL plus the raw path."""
    raw_path = (path or "/") + tail
    expected = expected_htu("https://broker.example.org", raw_path)
    assert expected == normalize_url("https://broker.example.org" + (path or "/"))
    assert host_header not in expected.removeprefix("https://broker.example.org") or host_header in path
