"""The JSON Schema of the config file, generated from the models and shipped as ``broker/config/schema.json``.

    python -m broker.config.schema            # rewrite the shipped file
    python -m broker.config.schema --check    # exit 1 if it is out of date (a test runs this)

Editors (VS Code's YAML extension, JetBrains) validate and complete a config with it: put
``# yaml-language-server: $schema=<path to schema.json>`` at the top of the file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from broker.config.models import Config

SCHEMA_FILE = Path(__file__).with_name("schema.json")


def config_schema() -> dict[str, Any]:
    schema = Config.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "broker configuration (version 1)"
    return schema


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
