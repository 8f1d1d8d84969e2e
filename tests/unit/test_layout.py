"""The shape of the package (STYLE.md, "Target layout"), kept by tests rather than by memory: no import circle
(function-level imports included), nothing of ``broker.dev`` or ``broker.sdk`` on the server path, the pure
modules free of aiohttp."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "broker"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every broker module ``path`` imports, at any depth (functions too) but not under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {name for name in out if name in modules}


def test_no_import_circle() -> None:
    modules = _modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    graph = {name: {d for d in deps if d != name} for name, deps in graph.items()}
    # a module importing its own package's __init__ is not a circle we care about
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for dep in sorted(graph[name]):
            if name.startswith(dep + "."):
                continue
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_the_server_path_imports_no_dev_tool_and_no_sdk() -> None:
    loaded = _loaded_after("import broker.app, broker.server, broker.workers")
    assert not {m for m in loaded if m.startswith(("broker.dev", "broker.sdk"))}


@pytest.mark.parametrize(
    "module",
    [
        "broker.policy.engine",
        "broker.policy.counters",
        "broker.policy.approvers",
        "broker.policy.schemas",
        "broker.identity.jwks",
        "broker.identity.dpop",
        "broker.identity.spiffe",
        "broker.txn.tokens",
        "broker.gateway.filters",
        "broker.canonical",
        "broker.mcp.jsonrpc",
        "broker.mcp.sse",
    ],
)
def test_pure_modules_import_no_aiohttp(module: str) -> None:
    assert "aiohttp" not in _loaded_after(f"import {module}")


def test_the_agent_side_connector_imports_no_server_module() -> None:
    # `broker connect` runs beside an agent: it shares the SDK's signer and pure value parsers (jose, intent),
    # never the broker's pipeline, policy engine, state, audit or config
    loaded = _loaded_after("import broker.sdk.connect")
    server_side = (
        "broker.gateway",
        "broker.mcp",
        "broker.app",
        "broker.server",
        "broker.state",
        "broker.audit",
    )
    server_side += (
        "broker.policy.engine",
        "broker.policy.cel",
        "broker.txn",
        "broker.config",
        "broker.runtime",
    )
    server_side += ("broker.identity.principal", "broker.identity.tokens", "broker.identity.dpop")
    assert not {m for m in loaded if m.startswith(server_side)}
