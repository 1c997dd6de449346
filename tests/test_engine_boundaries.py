"""engine/ is the logic; it never imports streamlit (the pages are its only UI). Its modules
import one another without cycles, and the command line (engine/cli/) is its top layer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_engine_module_imports_streamlit():
    offenders = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "streamlit"]
    assert offenders == []


def test_importing_every_engine_module_loads_no_streamlit():
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "engine").rglob("*.py") if p.name != "__main__.py"
    )
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print('streamlit' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def _engine_modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted((ROOT / "engine").rglob("*.py"))}


def _engine_imports(path: Path, modules: dict[str, Path], module_level_only: bool) -> set[str]:
    """The engine modules (or packages) a file imports; ``from pkg import name`` counts as
    ``pkg.name`` when that is a module, else as ``pkg``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in tree.body if module_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("engine"):
                found.add(name)
    return found


def test_engine_modules_import_one_another_without_cycles():
    """At module level (an import inside a function runs later, when every module is loaded)."""
    modules = _engine_modules()
    graph = {name: _engine_imports(path, modules, module_level_only=True) - {name} for name, path in modules.items()}
    state: dict[str, str] = {}
    cycles = []

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for imported in sorted(graph[name]):
            if state.get(imported) == "open":
                cycles.append(trail[trail.index(imported):] + [imported])
            elif imported not in state:
                visit(imported, trail + [imported])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_command_line_is_the_top_layer():
    """Nothing in engine/ imports engine.cli (except ``python -m engine``); in engine/cli/, the
    command modules use common.py and cluster.py, never one another, and those two never
    import a command module."""
    modules = _engine_modules()
    imports = {name: _engine_imports(path, modules, module_level_only=False) for name, path in modules.items()}
    below = [f"{name} imports {sorted(i for i in found if i.startswith('engine.cli'))}"
             for name, found in imports.items()
             if not name.startswith("engine.cli") and name != "engine.__main__"
             and any(i == "engine.cli" or i.startswith("engine.cli.") for i in found)]
    assert below == []
    shared = {"engine.cli.common", "engine.cli.cluster"}
    commands = {name for name in modules if name.startswith("engine.cli.")} - shared
    assert commands >= {"engine.cli.plan", "engine.cli.execute", "engine.cli.profile"}
    crossing = [f"{name} imports {sorted(imports[name] & (commands | {'engine.cli'}))}"
                for name in commands | shared if imports[name] & (commands | {"engine.cli"})]
    assert crossing == []
