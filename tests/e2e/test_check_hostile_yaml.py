"""``broker check`` and ``broker policy test`` as subprocesses on hostile YAML (HOSTILE Y09): exit 1 with one
``FILE:LINE: ...`` line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

LAUGHS = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)
)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version: 1\nx: &a [*a]\n", "2: recursive YAML alias *a: it is inside its own anchor &a (line 2)"),
        (LAUGHS, "6: document too large: alias *a4 takes it past 200000 nodes (alias bomb?)"),
        (
            "x: " + "[" * 5000 + "]" * 5000 + "\n",
            "1: document too deep: a collection nests it past 64 levels",
        ),
    ],
    ids=["Y09-recursive-alias", "Y09-billion-laughs", "Y09-deep-nesting"],
)
def test_check_refuses_hostile_yaml_with_one_located_line(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "hostile.yaml"
    config.write_text(text)
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"{config}:{expected}"], result.stderr
    assert result.stdout == ""


def test_policy_test_refuses_a_recursive_fixture(tmp_path: Path) -> None:
    fixture = tmp_path / "cases.yaml"
    fixture.write_text("cases:\n  - &c {name: x, expect: [*c]}\n")
    result = run_cli("policy", "test", str(fixture), "-c", "config/examples/expense.yaml")
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{fixture}:2: recursive YAML alias *c: it is inside its own anchor &c (line 2)"
    ]
    assert "Traceback" not in result.stderr
