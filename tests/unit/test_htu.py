"""htu normalisation and comparison (RFC 9449 §4.3 check 9, RFC 3986 §6.2.2-§6.2.3; HOSTILE D09a-e, D10)."""

from __future__ import annotations

import pytest

from broker.identity.htu import expected_htu, normalize_url

try:
    from hypothesis import given
    from hypothesis import strategies as st
except ModuleNotFoundError:  # not a dependency of .venv yet (pyproject lists it under [dev])
    HAVE_HYPOTHESIS = False
else:
    HAVE_HYPOTHESIS = True

BASE = "https://rs.example"


NORMALIZE_ROWS = [
    ("https://rs.example/mcp", "https://rs.example/mcp"),
    ("https://rs.example/mcp?x=1", "https://rs.example/mcp"),  # D09a: query ignored
    ("https://rs.example/mcp#frag", "https://rs.example/mcp"),  # D09a: fragment ignored
    ("https://rs.example/mcp?x=1#f", "https://rs.example/mcp"),
    ("HTTPS://RS.EXAMPLE:443/mcp", "https://rs.example/mcp"),  # D09c: case of scheme/host, default port
    ("http://rs.example:80/mcp", "http://rs.example/mcp"),
    ("https://rs.example:/mcp", "https://rs.example/mcp"),  # RFC 3986 §6.2.3: empty port
    ("https://rs.example:8443/mcp", "https://rs.example:8443/mcp"),
    ("https://rs.example:08443/mcp", "https://rs.example:8443/mcp"),
    ("https://rs.example:80/mcp", "https://rs.example:80/mcp"),  # 80 is not https's default
    ("https://rs.example", "https://rs.example/"),  # empty path -> "/"
    ("https://rs.example?x", "https://rs.example/"),
    ("https://rs.example/%7Euser", "https://rs.example/~user"),  # D09d: unreserved decoded
    ("https://rs.example/%41%62%2d%5f%2E%30", "https://rs.example/Ab-_.0"),
    ("https://rs.example/a%2fb", "https://rs.example/a%2Fb"),  # D09d: %2F kept, hex upper
    ("https://rs.example/a%3ab", "https://rs.example/a%3Ab"),
    ("https://rs.example/MCP", "https://rs.example/MCP"),  # path case kept
    ("https://rs.example/mcp/", "https://rs.example/mcp/"),  # trailing slash kept
    ("https://rs.example/a;b=c/@:!$&'()*+,", "https://rs.example/a;b=c/@:!$&'()*+,"),
    ("https://[::1]:443/x", "https://[::1]/x"),
    ("https://[2001:DB8::1]:8443/x", "https://[2001:db8::1]:8443/x"),
    ("https://127.0.0.1:8443/x", "https://127.0.0.1:8443/x"),
    ("https://rs.example/a..b/.c/d.", "https://rs.example/a..b/.c/d."),  # not dot segments
]


@pytest.mark.parametrize(("url", "normal"), NORMALIZE_ROWS, ids=[url for url, _ in NORMALIZE_ROWS])
def test_normalize_url(url: str, normal: str) -> None:
    assert normalize_url(url) == normal


@pytest.mark.parametrize(
    "url",
    [
        "https://rs.example/a/../b",  # D09d: dot segments refused, never resolved
        "https://rs.example/a/./b",
        "https://rs.example/..",
        "https://rs.example/a/%2E%2E/b",  # encoded dot segment decodes to ".."
        "https://rs.example/a/%2e/b",
        "https://rs.example//b",  # D09d: double slash
        "https://rs.example/a//b",
        "https://rs.example/a/b//",
        "https://user:pw@rs.example/x",  # userinfo
        "https://rs.example:99999/x",
        "https://rs.example:44a/x",
        "https://rs.example:443:443/x",
        "https:///x",  # empty host
        "https://rs%2Eexample/x",
        "https://[::1/x",
        "https://rs.example/a b",  # whitespace / control / non-ASCII
        "https://rs.example/a\tb",
        "https://rs.example/a\nb",
        " https://rs.example/x",
        "https://rs.example/caf\u00e9",
        "https://rs.example/a\\b",
        "https://rs.example/a%zzb",  # malformed percent-encoding
        "https://rs.example/a%2",
        "https://rs.example/a[b]",
        "ftp://rs.example/x",  # scheme
        "rs.example/x",
        "/mcp",
        "https:/rs.example/x",
        "",
        "https://rs.example/" + "a" * 9000,
    ],
    ids=repr,
)
def test_normalize_url_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        normalize_url(url)


# Rows: (configured public_url, raw request path, the htu a client put in its proof, equal?)
@pytest.mark.parametrize(
    ("public_url", "request_path", "proof_htu", "equal"),
    [
        (BASE, "/mcp?x=1", "https://rs.example/mcp", True),  # D09a
        (BASE, "/mcp", "https://rs.example/mcp/", False),  # D09b
        (BASE, "/mcp/", "https://rs.example/mcp", False),  # D09b, other direction
        (BASE, "/mcp", "HTTPS://RS.EXAMPLE:443/mcp", True),  # D09c
        (BASE, "/~u/x", "https://rs.example/%7Eu/x", True),  # D09d
        (BASE, "/%7eu/x", "https://rs.example/~u/x", True),  # D09d
        (BASE, "/a%2Fb", "https://rs.example/a/b", False),  # D09d: %2F is not /
        (BASE, "/MCP", "https://rs.example/mcp", False),  # D09d: path case-sensitive
        (BASE, "/mcp", "https://other.example/mcp", False),  # D09e: other host
        (BASE, "/mcp", "https://rs.example:8443/mcp", False),  # D09e: other port
        (BASE, "/mcp", "http://rs.example/mcp", False),  # other scheme
        (BASE + "/", "/mcp", "https://rs.example/mcp", True),  # base with trailing slash
        (BASE + ":443", "/mcp", "https://rs.example/mcp", True),
        (BASE + "/broker", "/v1/tools", "https://rs.example/broker/v1/tools", True),  # path prefix
        (BASE + "/broker/", "/v1/tools", "https://rs.example/broker/v1/tools", True),
        (BASE + "/broker", "/v1/tools", "https://rs.example/v1/tools", False),
        (BASE, "/", "https://rs.example", True),
    ],
    ids=lambda v: v if isinstance(v, str) else str(v),
)
def test_expected_htu_comparison(public_url: str, request_path: str, proof_htu: str, equal: bool) -> None:
    assert (normalize_url(proof_htu) == expected_htu(public_url, request_path)) is equal


@pytest.mark.parametrize(
    ("public_url", "request_path"),
    [
        (BASE, "/a/../b"),  # D09d: the request itself has dot segments
        (BASE, "//b"),
        (BASE, "http://evil.example/mcp"),  # D10: absolute-form target cannot pick the host
        (BASE, "*"),
        (BASE, ""),
        (BASE + "?q=1", "/mcp"),  # configured base must not carry a query or fragment
        (BASE + "#f", "/mcp"),
        ("not a url", "/mcp"),
    ],
    ids=repr,
)
def test_expected_htu_refuses(public_url: str, request_path: str) -> None:
    with pytest.raises(ValueError):
        expected_htu(public_url, request_path)


def test_expected_htu_ignores_client_host_headers() -> None:
    # D10: there is no parameter through which Host / X-Forwarded-* could reach the htu: the configured base
    # URL is the only authority.
    assert expected_htu("https://broker.example.org", "/v1/tools") == "https://broker.example.org/v1/tools"


def test_normal_forms_are_fixed_points() -> None:
    # The deterministic half of the idempotence property (the hypothesis test below explores further).
    for url, normal in NORMALIZE_ROWS:
        assert normalize_url(normal) == normal, url


if HAVE_HYPOTHESIS:
    # Mostly valid pieces (so most examples reach the normal form), plus the ones normalisation rewrites
    # (%2e, %7e, %41 ...) and a few that must be refused ("." pieces can form dot segments, "" segments "//").
    _piece = st.sampled_from(
        [
            "a",
            "B",
            "z9",
            "-",
            ".",
            "_",
            "~",
            ":",
            "@",
            "!",
            "$",
            "&",
            "'",
            "(",
            ")",
            "*",
            "+",
            ",",
            ";",
            "=",
            "%2e",
            "%2E",
            "%7e",
            "%7E",
            "%2f",
            "%41",
            "%25",
            "%3a",
            "%c3%a9",
        ]
    )
    _path = st.lists(st.lists(_piece, max_size=4).map("".join), max_size=5).map(
        lambda segments: "".join("/" + segment for segment in segments)
    )
    _urls = st.one_of(
        st.text(max_size=60),
        st.builds(
            "{}://{}{}{}".format,
            st.sampled_from(["http", "https", "HTTPS", "Http"]),
            st.sampled_from(
                [
                    "rs.example",
                    "RS.Example",
                    "[::1]",
                    "[::1]:443",
                    "127.0.0.1",
                    "rs.example:443",
                    "rs.example:80",
                    "rs.example:08443",
                    "rs.example:",
                    "u@rs.example",
                ]
            ),
            _path,
            st.sampled_from(["", "?q=1", "#f", "?a#b", "?%zz", "# x"]),
        ),
    )

    @given(_urls)  # type: ignore[untyped-decorator,unused-ignore]  # untyped when hypothesis is absent
    def test_normalize_url_is_idempotent(url: str) -> None:
        try:
            once = normalize_url(url)
        except ValueError:
            return
        assert normalize_url(once) == once

else:

    @pytest.mark.skip(reason="hypothesis is not installed in .venv")
    def test_normalize_url_is_idempotent() -> None:
        pass
