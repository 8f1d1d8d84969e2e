"""The shipped JSON Schema (broker/config/schema.json) against the configs we ship, as an editor sees them: the raw
YAML, before ``${VAR}`` expansion (issue 14). Every broker config under config/ and deploy/ (ConfigMaps included)
validates; placeholders are accepted wherever the loader expands them and nothing else loosens."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from broker.config.schema import SCHEMA_FILE

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads(SCHEMA_FILE.read_text())
MODELINE = re.compile(r"^# yaml-language-server: \$schema=(\S+)$")


def is_broker_config(document: Any) -> bool:
    return isinstance(document, dict) and "version" in document and "server" in document


def broker_configs() -> list[tuple[str, Any]]:
    """(name, raw document) of every broker config in a YAML file under config/ and deploy/, and of every one
    embedded in a ConfigMap there."""
    found = []
    for path in sorted([*(ROOT / "config").rglob("*.y*ml"), *(ROOT / "deploy").rglob("*.y*ml")]):
        for document in yaml.safe_load_all(path.read_text()):
            name = str(path.relative_to(ROOT))
            if is_broker_config(document):
                found.append((name, document))
            elif isinstance(document, dict) and document.get("kind") == "ConfigMap":
                for key, text in (document.get("data") or {}).items():
                    embedded = yaml.safe_load(text) if key.endswith((".yaml", ".yml")) else None
                    if is_broker_config(embedded):
                        found.append((f"{name}:{key}", embedded))
    return found


CONFIGS = broker_configs()


def test_the_search_finds_the_configs_we_ship() -> None:
    names = {name for name, _ in CONFIGS}
    assert {
        "config/broker.yaml",
        "config/examples/expense.yaml",
        "deploy/kubernetes/configmap.yaml:broker.yaml",
    } <= names


@pytest.mark.parametrize(("name", "document"), CONFIGS, ids=[name for name, _ in CONFIGS])
def test_every_shipped_config_validates_as_written(name: str, document: Any) -> None:
    errors = [
        f"{list(e.absolute_path)}: {e.message}"
        for e in jsonschema.Draft202012Validator(SCHEMA).iter_errors(document)
    ]
    assert errors == []


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (ROOT / "config").rglob("*.yaml") if is_broker_config(yaml.safe_load(p.read_text()))),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_example_configs_point_editors_at_the_schema(path: Path) -> None:
    match = MODELINE.match(path.read_text().splitlines()[0])
    assert match, f"{path}: first line should be '# yaml-language-server: $schema=<relative path>'"
    assert (path.parent / match.group(1)).resolve() == SCHEMA_FILE


def minimal(**audit: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "server": {"public_url": "https://b.example.org", "tls": {"cert": "c", "key": "k", "client_ca": "a"}},
        "identity": {"trust_domain": "example.org", "audience": "x"},
        "signing": {"key_file": "s"},
        "audit": {"file": "a", **audit},
    }


P = pytest.param
ROWS = [
    P({"checkpoint_every": 100}, True, id="integer"),
    P({"checkpoint_every": "${EVERY}"}, True, id="placeholder-for-integer"),
    P({"checkpoint_every": "${EVERY:-100}"}, True, id="placeholder-with-default"),
    P({"checkpoint_every": "many"}, False, id="plain-string-for-integer"),
    P({"checkpoint_every": "${not a var}"}, False, id="not-a-placeholder"),
    P({"checkpoint_every": 0}, False, id="integer-out-of-range"),
    P({"fsync": "${FSYNC:-true}"}, True, id="placeholder-for-boolean"),
    P({"checkpoint_evry": 100}, False, id="unknown-key"),
]


@pytest.mark.parametrize(("audit", "valid"), ROWS)
def test_placeholders_are_accepted_where_the_loader_expands_them(audit: dict[str, Any], valid: bool) -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    assert validator.is_valid(minimal(**audit)) is valid


@pytest.mark.parametrize(
    ("state", "valid"),
    [
        P({"backend": "${BROKER_STATE:-memory}"}, True, id="placeholder-for-enum"),
        P({"backend": "redis", "redis_url": "redis://h:6379/0"}, True, id="enum"),
        P({"backend": "mongo"}, False, id="enum-typo"),
    ],
)
def test_enums_take_a_placeholder_but_no_other_string(state: dict[str, Any], valid: bool) -> None:
    assert jsonschema.Draft202012Validator(SCHEMA).is_valid({**minimal(), "state": state}) is valid
