"""The JSON Schema of the config file, generated from the models and shipped as ``broker/config/schema.json``.

    python -m broker.config.schema            # rewrite the shipped file
    python -m broker.config.schema --check    # exit 1 if it is out of date (a test runs this)

Editors (VS Code's YAML extension, JetBrains) validate and complete a config with it: put
``# yaml-language-server: $schema=<path to schema.json>`` at the top of the file (the shipped examples do).

The schema describes the file as written, before ``${VAR}`` expansion: the loader expands placeholders in every
string and a plain scalar that is one whole placeholder takes the type of its value (``checkpoint_every:
${N:-100}`` is an integer), so every field that a free string would not satisfy — numbers, booleans, enums,
patterned names — also accepts a string holding a placeholder (``anyOf`` with ``$defs/Placeholder``). The value
it expands to is checked against the field's own type when the config is loaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from broker.config.models import Config

SCHEMA_FILE = Path(__file__).with_name("schema.json")

PLACEHOLDER_REF = "#/$defs/Placeholder"
PLACEHOLDER: dict[str, Any] = {
    "type": "string",
    # the loader's ${VAR} / ${VAR:-default} (broker/config/loader.py), anywhere in the string
    "pattern": r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}",
    "description": "${VAR} or ${VAR:-default}, expanded from the environment when the config is loaded; the "
    "value is then checked against the field's own type",
}
#: keywords that describe a field rather than constrain its value: they stay outside the anyOf
_ANNOTATIONS = ("title", "description", "default", "examples", "deprecated")
_STRING_CONSTRAINTS = ("enum", "const", "pattern", "minLength", "maxLength")


def config_schema() -> dict[str, Any]:
    schema = Config.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "broker configuration (version 1)"
    accepting: dict[str, Any] = _accepting_placeholders(schema)
    accepting.setdefault("$defs", {})["Placeholder"] = PLACEHOLDER
    return accepting


def _needs_placeholder(node: dict[str, Any]) -> bool:
    """A scalar schema that a string holding ``${VAR}`` would not satisfy as it stands."""
    kind = node.get("type")
    if kind in ("integer", "number", "boolean"):
        return True
    return kind in ("string", None) and "$ref" not in node and any(k in node for k in _STRING_CONSTRAINTS)


def _accepting_placeholders(node: Any) -> Any:
    """``node`` with every value schema inside it also accepting a placeholder where it needs to."""
    if not isinstance(node, dict):
        return node
    out = {key: _children(key, value) for key, value in node.items()}
    if "anyOf" in out:
        if any(_needs_placeholder(b) for b in out["anyOf"]):
            out["anyOf"] = [*out["anyOf"], {"$ref": PLACEHOLDER_REF}]
        return out
    if _needs_placeholder(out):
        constraint = {k: v for k, v in out.items() if k not in _ANNOTATIONS}
        return {
            **{k: v for k, v in out.items() if k in _ANNOTATIONS},
            "anyOf": [constraint, {"$ref": PLACEHOLDER_REF}],
        }
    return out


def _children(key: str, value: Any) -> Any:
    if key in ("properties", "$defs") and isinstance(value, dict):
        return {name: _accepting_placeholders(child) for name, child in value.items()}
    if key in ("items", "additionalProperties"):
        return _accepting_placeholders(value)
    if key == "anyOf" and isinstance(value, list):
        # the branches of a union are not wrapped one by one: the union gets one Placeholder branch
        return [{k: _children(k, v) for k, v in branch.items()} for branch in value]
    return value


def render() -> str:
    return json.dumps(config_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    if "--check" in argv:
        if not SCHEMA_FILE.exists() or SCHEMA_FILE.read_text() != render():
            print(f"{SCHEMA_FILE} is out of date: run python -m broker.config.schema", file=sys.stderr)
            return 1
        return 0
    SCHEMA_FILE.write_text(render())
    print(f"wrote {SCHEMA_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
