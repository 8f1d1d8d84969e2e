"""Every file a config names, loaded the way the broker will load it, for ``broker check`` and ``broker run``.

:data:`FILE_FIELDS` lists the fields that name files: the server's certificate, key and client trust bundle, the
admin token, the issuers' ``jwks_file`` and CA bundles, the signing key and previous keys, the audit log, each
upstream's own TLS files, webhook CA bundles. An upstream without TLS files of its own uses the server's, which the
server's lines already name, so a missing ``server.tls.cert`` is reported once, there, and not at every tool.
:func:`file_problems` checks each file once (read, parse, and a certificate with the key presented with it) and
reports each problem once, at the first line naming the file, as ``FILE:LINE: where: path: what``.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from broker.config.loader import ConfigProblem, Loc, format_loc
from broker.identity.jwks import KeySet
from broker.identity.jws import JwsError, loads_strict
from broker.jose import Signer
from broker.keys import public_jwks_from_file

Kind = Literal[
    "certificate",
    "private key",
    "CA bundle",
    "JWKS",
    "signing key",
    "public keys",
    "admin token",
    "audit log",
]
#: the admin token's floor, as ``broker.runtime.read_admin_token`` enforces it when serving
MIN_ADMIN_TOKEN_CHARS = 16

_ANY = -1  # any index of a list
_UPSTREAM_TLS: tuple[tuple[str, Kind], ...] = (
    ("ca", "CA bundle"),
    ("cert", "certificate"),
    ("key", "private key"),
)
#: every config field that names a file, in config order
FILE_FIELDS: tuple[tuple[Loc, Kind], ...] = (
    (("server", "tls", "cert"), "certificate"),
    (("server", "tls", "key"), "private key"),
    (("server", "tls", "client_ca"), "CA bundle"),
    (("server", "admin_token_file"), "admin token"),
    (("identity", "issuers", _ANY, "jwks_file"), "JWKS"),
    (("identity", "issuers", _ANY, "ca"), "CA bundle"),
    (("signing", "key_file"), "signing key"),
    (("signing", "previous_key_files", _ANY), "public keys"),
    (("audit", "file"), "audit log"),
    *((("tools", _ANY, "upstream", "tls", name), kind) for name, kind in _UPSTREAM_TLS),
    *((("mcp_servers", _ANY, "upstream", "tls", name), kind) for name, kind in _UPSTREAM_TLS),
    (("approvals", "webhooks", _ANY, "ca"), "CA bundle"),
)


@dataclass(frozen=True)
class NamedFile:
    loc: Loc
    path: Path
    kind: Kind


@dataclass(frozen=True)
class KeyPair:
    """A certificate and the private key presented with it; reported at ``at`` (the location that paired them)."""

    cert: NamedFile
    key: NamedFile
    at: Loc


class _Unusable(Exception):
    """What is wrong with one file, as the operator should read it."""


def file_fields(tree: Any) -> Iterator[tuple[Loc, Kind, Any]]:
    """(location, kind, value) of every present, non-null file field of a config given as nested mappings and
    lists: a validated config's ``model_dump()`` (values are resolved paths), or the raw data of one that did not
    validate (values are whatever the file holds there)."""
    for pattern, kind in FILE_FIELDS:
        for loc, value in _walk(tree, pattern, ()):
            if value is not None:
                yield loc, kind, value


def _walk(node: Any, pattern: Loc, loc: Loc) -> Iterator[tuple[Loc, Any]]:
    if not pattern:
        yield loc, node
        return
    head, rest = pattern[0], pattern[1:]
    if head == _ANY:
        for index, item in enumerate(node if isinstance(node, list) else []):
            yield from _walk(item, rest, (*loc, index))
    elif isinstance(node, dict) and head in node:
        yield from _walk(node[head], rest, (*loc, head))


def named_files(paths: Sequence[tuple[Loc, Kind, Path]]) -> list[NamedFile | KeyPair]:
    """The files of :func:`file_fields` (values resolved to paths), then each certificate/key pair to check.

    An upstream without a certificate or key of its own presents the server's (``broker.tls``), a pair checked at
    ``server.tls``; one with either of its own is checked as the pair it will present."""
    files = [NamedFile(loc, path, kind) for loc, kind, path in paths]
    by_loc = {f.loc: f for f in files}
    server_cert, server_key = by_loc.get(("server", "tls", "cert")), by_loc.get(("server", "tls", "key"))
    pairs: list[KeyPair] = []
    if server_cert is not None and server_key is not None:
        pairs.append(KeyPair(server_cert, server_key, server_key.loc))
    for upstream in dict.fromkeys(f.loc[:-2] for f in files if f.loc[0] in ("tools", "mcp_servers")):
        cert, key = by_loc.get((*upstream, "tls", "cert")), by_loc.get((*upstream, "tls", "key"))
        if cert is None and key is None:
            continue
        pair_cert, pair_key = cert or server_cert, key or server_key
        if pair_cert is not None and pair_key is not None:
            pairs.append(KeyPair(pair_cert, pair_key, (cert or pair_key).loc))
    return [*files, *pairs]


def file_problems(
    files: Sequence[NamedFile | KeyPair], *, file: str, line_of: Callable[[Loc], int]
) -> list[ConfigProblem]:
    """Check every named file once; one problem per unusable file (at the first line naming it) or pair."""
    usable: dict[tuple[Kind, Path], bool] = {}
    checked_pairs: set[tuple[Path, Path]] = set()
    problems: list[ConfigProblem] = []

    def report(loc: Loc, message: str) -> None:
        problems.append(ConfigProblem(file, line_of(loc), f"{format_loc(loc)}: {message}"))

    for item in files:
        if isinstance(item, NamedFile):
            if (item.kind, item.path) in usable:
                continue
            try:
                _CHECKS[item.kind](item.path)
            except _Unusable as exc:
                usable[(item.kind, item.path)] = False
                report(item.loc, str(exc))
            else:
                usable[(item.kind, item.path)] = True
            continue
        pair = (item.cert.path, item.key.path)
        if pair in checked_pairs:
            continue
        checked_pairs.add(pair)
        if usable.get(("certificate", pair[0])) and usable.get(("private key", pair[1])):
            try:
                _check_pair(*pair)
            except _Unusable as exc:
                report(item.at, str(exc))
    return problems


# --- one check per kind of file: raise _Unusable saying what is wrong, naming the path ----------------------------


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _Unusable(f"cannot read {path}: {exc.strerror or exc}") from None


def _json(path: Path) -> Any:
    """The file's JSON as the broker parses key files (strictly: no duplicate members, no NaN)."""
    data = _read(path)
    try:
        json.loads(data)  # first, for a message with a position in it
    except json.JSONDecodeError as exc:
        raise _Unusable(f"{path}: not JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise _Unusable(f"{path}: not JSON (not UTF-8)") from None
    try:
        return loads_strict(data)
    except JwsError as exc:
        raise _Unusable(f"{path}: JSON the broker refuses ({exc.reason})") from None


def _check_certificate(path: Path) -> None:
    try:
        x509.load_pem_x509_certificates(_read(path))
    except ValueError:
        raise _Unusable(f"{path}: not a PEM certificate") from None


def _check_private_key(path: Path) -> None:
    try:
        load_pem_private_key(_read(path), password=None)
    except TypeError:
        raise _Unusable(f"{path}: the private key is encrypted (the broker reads unencrypted PEM)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise _Unusable(f"{path}: not a PEM private key") from None


def _check_pair(cert: Path, key: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise _Unusable(f"{key} does not match the certificate {cert}") from None
        raise _Unusable(f"{key} cannot be used with {cert}: {exc.reason or exc}") from None


def _check_ca_bundle(path: Path) -> None:
    _read(path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        raise _Unusable(f"{path}: no usable CA certificate ({exc.reason or exc})") from None


def _check_jwks(path: Path) -> None:
    try:
        keys = KeySet.from_jwks(_json(path))
    except ValueError as exc:
        raise _Unusable(f"{path}: not a valid JWKS: {exc}") from None
    if not keys.entries:
        raise _Unusable(f"{path}: no usable verification key (skipped: {', '.join(keys.skipped)})")


def _check_signing_key(path: Path) -> None:
    try:
        Signer.from_jwk(_json(path))
    except ValueError as exc:  # JoseError, or cryptography refusing the key's numbers
        raise _Unusable(f"{path}: not a usable signing key: {exc}") from None


def _check_public_keys(path: Path) -> None:
    _json(path)
    try:
        public_jwks_from_file(path)
    except ValueError as exc:
        raise _Unusable(str(exc)) from None  # names the path already


def _check_admin_token(path: Path) -> None:
    if len(_read(path).strip()) < MIN_ADMIN_TOKEN_CHARS:
        raise _Unusable(f"{path}: the admin token must be at least {MIN_ADMIN_TOKEN_CHARS} characters")


def _check_audit_log(path: Path) -> None:
    """The broker appends to the file and creates it (and its folders) if missing: check without writing."""
    if path.exists():
        if not path.is_file():
            raise _Unusable(f"{path} is not a regular file")
        if not os.access(path, os.W_OK):
            raise _Unusable(f"{path} is not writable")
        return
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise _Unusable(f"cannot create {path}: {folder} is not a writable folder")


_CHECKS: dict[Kind, Callable[[Path], None]] = {
    "certificate": _check_certificate,
    "private key": _check_private_key,
    "CA bundle": _check_ca_bundle,
    "JWKS": _check_jwks,
    "signing key": _check_signing_key,
    "public keys": _check_public_keys,
    "admin token": _check_admin_token,
    "audit log": _check_audit_log,
}
