"""Config loading: located errors, ${VAR} expansion, relative paths, the shipped JSON Schema."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from broker.config.loader import ConfigError, load_config, parse_yaml
from broker.config.schema import SCHEMA_FILE, render

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """\
version: 1
server:
  public_url: https://broker.example.org
  tls: {cert: tls/broker.pem, key: tls/broker-key.pem, client_ca: tls/ca.pem}
identity: {trust_domain: example.org, audience: https://broker.example.org}
signing: {key_file: signing.jwk}
audit:
  file: ${AUDIT_FILE:-var/audit.jsonl}
  checkpoint_every: ${EVERY:-100}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.yaml"
    path.write_text(text)
    return path


def test_minimal_config_with_defaults_and_relative_paths(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, MINIMAL), environ={})
    config = loaded.config
    assert config.server.tls.cert == tmp_path / "tls" / "broker.pem"
    assert config.audit.file == tmp_path / "var" / "audit.jsonl"
    assert config.audit.checkpoint_every == 100
    assert config.state.backend == "memory"
    assert len(loaded.policy_version) == 12


def test_environment_expansion_types_and_escapes(tmp_path: Path) -> None:
    text = MINIMAL.replace("audience: https://broker.example.org", 'audience: "$${literal}"')
    loaded = load_config(write(tmp_path, text), environ={"AUDIT_FILE": "/abs/a.jsonl", "EVERY": "7"})
    assert loaded.config.audit.file == Path("/abs/a.jsonl")
    assert loaded.config.audit.checkpoint_every == 7  # one whole reference takes its value's type
    assert loaded.config.identity.audience == "${literal}"


def test_policy_version_changes_with_content(tmp_path: Path) -> None:
    first = load_config(write(tmp_path, MINIMAL), environ={}).policy_version
    second = load_config(write(tmp_path, MINIMAL), environ={"EVERY": "5"}).policy_version
    assert first != second


@pytest.mark.parametrize(
    ("mutate", "line", "message"),
    [
        (lambda t: t.replace("version: 1", "version: 2"), 1, "version: Input should be 1"),
        (lambda t: t + "extra: 1\n", 10, "extra: unknown key"),
        (
            lambda t: t.replace("${EVERY:-100}", "many"),
            9,
            "audit.checkpoint_every: Input should be a valid integer",
        ),
        (
            lambda t: t.replace("${AUDIT_FILE:-var/audit.jsonl}", "${NOPE}"),
            8,
            "environment variable NOPE is not set",
        ),
        (
            lambda t: t.replace("signing: {key_file: signing.jwk}\n", ""),
            1,
            "signing: required key is missing",
        ),
        (lambda t: t + "audit: {}\n", 10, "duplicate key 'audit'"),
        (lambda t: t + "x: !!python/object:os.system ls\n", 10, "unsupported YAML tag"),
        (lambda t: t.replace("audit:\n", "audit: [\n"), 8, "YAML syntax"),
    ],
    ids=[
        "version",
        "Y03-unknown-key",
        "wrong-type",
        "unset-variable",
        "missing-section",
        "duplicate-key",
        "Y09-python-tag",
        "syntax",
    ],
)
def test_problems_are_located(tmp_path: Path, mutate: object, line: int, message: str) -> None:
    path = write(tmp_path, mutate(MINIMAL))  # type: ignore[operator]
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    rendered = [str(p) for p in caught.value.problems]
    assert any(r.startswith(f"{path}:{line}: ") and message in r for r in rendered), rendered


def test_alias_bomb_is_refused() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    with pytest.raises(ConfigError, match="too large"):
        parse_yaml(bomb, file="bomb.yaml", environ={})


def test_shipped_schema_is_current_and_validates_the_examples() -> None:
    assert SCHEMA_FILE.read_text() == render(), "run: python -m broker.config.schema"
    schema = yaml.safe_load(SCHEMA_FILE.read_text())
    for path in (ROOT / "config").rglob("*.yaml"):
        if "policy-tests" in path.name or "principals" in path.name:  # fixtures, access-review input
            continue
        data, _ = parse_yaml(path.read_text(), file=str(path), environ={"BROKER_CERTS": "/certs"})
        jsonschema.validate(data, schema)


def test_shipped_config_reference_is_current() -> None:
    from broker.config.reference import REFERENCE_FILE
    from broker.config.reference import render as render_reference

    assert REFERENCE_FILE.read_text() == render_reference(), "run: python -m broker.config.reference"
