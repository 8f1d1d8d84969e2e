"""The configuration reference, generated from the JSON Schema (itself generated from the models).

python -m broker.config.reference            # rewrite deploy/config-reference.md
python -m broker.config.reference --check    # exit 1 if it is out of date (a test runs this)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from broker.config.schema import PLACEHOLDER_REF, config_schema

REFERENCE_FILE = Path(__file__).resolve().parents[2] / "deploy" / "config-reference.md"

HEADER = """# Configuration reference

Generated from the config models by `python -m broker.config.reference` (do not edit by hand). One YAML file,
`version: 1`; unknown keys and wrong types are errors reported as `FILE:LINE: message`; `${VAR}` and
`${VAR:-default}` are expanded in every string, and a value that is one whole `${VAR}` takes the type of what it
expands to, so any key below may be given as a placeholder; relative paths are relative to the config file.
`broker check` also loads every file the config names. The same definitions are shipped as a JSON Schema in
`broker/config/schema.json` for editors: start a config with
`# yaml-language-server: $schema=<path to broker/config/schema.json>`.
"""


def _without_placeholder(prop: dict[str, Any]) -> dict[str, Any]:
    """The field's own type: every key may be a ``${VAR}`` placeholder, which the header says once."""
    branches = [b for b in prop.get("anyOf", []) if b.get("$ref") != PLACEHOLDER_REF]
    if "anyOf" not in prop or len(branches) == len(prop["anyOf"]):
        return prop
    rest = {k: v for k, v in prop.items() if k != "anyOf"}
    return {**branches[0], **rest} if len(branches) == 1 else {**rest, "anyOf": branches}


def _type_of(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    prop = _without_placeholder(prop)
    if "$ref" in prop:
        return f"[{prop['$ref'].rsplit('/', 1)[-1]}](#{prop['$ref'].rsplit('/', 1)[-1].lower()})"
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{prop['const']}`"
    if "anyOf" in prop:
        return " or ".join(_type_of(p, defs) for p in prop["anyOf"])
    kind = prop.get("type", "any")
    if kind == "array":
        return f"list of {_type_of(prop.get('items', {}), defs)}"
    if kind == "object" and "additionalProperties" in prop and isinstance(prop["additionalProperties"], dict):
        return f"map of {_type_of(prop['additionalProperties'], defs)}"
    fmt = prop.get("format")
    return f"{kind} ({fmt})" if fmt else str(kind)


def _default(prop: dict[str, Any], required: bool) -> str:
    if required:
        return "**required**"
    if "default" in prop:
        return f"`{json.dumps(prop['default'])}`"
    return ""


def _table(name: str, model: dict[str, Any], defs: dict[str, Any]) -> list[str]:
    lines = [f"## {name}", ""]
    if model.get("description"):
        lines += [" ".join(model["description"].split()), ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    required = set(model.get("required", []))
    for key, prop in model.get("properties", {}).items():
        prop = _without_placeholder(prop)
        meaning = " ".join(prop.get("description", "").split())
        bounds = [f"{word} {prop[k]}" for k, word in (("minimum", "≥"), ("maximum", "≤")) if k in prop]
        if bounds:
            meaning = f"{meaning} ({', '.join(bounds)})".strip()
        lines.append(
            f"| `{key}` | {_type_of(prop, defs)} | {_default(prop, key in required)} | {meaning.replace('|', '/')} |"
        )
    return [*lines, ""]


def render() -> str:
    schema = config_schema()
    defs = schema.get("$defs", {})
    parts = [HEADER, *_table("Top level (Config)", schema, defs)]
    for name in sorted(defs):
        if f"#/$defs/{name}" != PLACEHOLDER_REF:
            parts += _table(name, defs[name], defs)
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str]) -> int:
    if "--check" in argv:
        if not REFERENCE_FILE.exists() or REFERENCE_FILE.read_text() != render():
            print(f"{REFERENCE_FILE} is out of date: run python -m broker.config.reference", file=sys.stderr)
            return 1
        return 0
    REFERENCE_FILE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE_FILE.write_text(render())
    print(f"wrote {REFERENCE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
