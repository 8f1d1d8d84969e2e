"""The shipped documentation stands alone: no README, operator document, deploy file, config example or
package docstring sends a reader to ``../shared/…``, files that are not in this repository.

Test tooling under ``tests/`` is left out on purpose: ``tests/security/coverage.py`` reads the hostile-input
checklist from beside the repository when it is there (and its committed copy ``hostile_ids.txt`` otherwise)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEXT_SUFFIXES = {".md", ".toml", ".yaml", ".yml", ".json", ".txt", ".py", ".service", ".example", ".cfg"}
TEXT_NAMES = {"Makefile", "Containerfile", "Dockerfile"}
SKIPPED_TOP = {"tests", "certs"}  # test tooling (see above); certs/ is generated development PKI
SHARED = re.compile(r"(?<![\w-])(?:\.\./)?shared/")


def shipped_text_files() -> list[Path]:
    found = []
    for path in ROOT.rglob("*"):
        relative = path.relative_to(ROOT)
        top = relative.parts[0]
        if top.startswith(".") or top.endswith(".egg-info") or top in SKIPPED_TOP:
            continue
        if any(part in ("__pycache__", "node_modules") for part in relative.parts):
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES):
            found.append(path)
    return found


def test_the_walk_sees_the_documents() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in shipped_text_files()}
    assert {"README.md", "deploy/threat-model.md", "deploy/operations.md", "pyproject.toml"} <= names
    assert "broker/cli.py" in names


def test_no_shipped_document_refers_to_shared_files() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in shipped_text_files()
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if SHARED.search(line)
    ]
    assert not offenders, "documents must stand alone (link the RFC or say it in place):\n" + "\n".join(
        offenders
    )


def test_the_pattern_finds_what_it_must() -> None:
    hits = ["see ../shared/CONTRACT.md", "those of `shared/HOSTILE.md`", "(shared/STYLE.md)"]
    misses = ["shared_dict/x", "not-shared/y", "the shared key", "unshared/z"]
    assert all(SHARED.search(text) for text in hits)
    assert not any(SHARED.search(text) for text in misses)
