"""The house's layers: imports only go down.

llama_core knows nothing of finetune; finetune's library modules know nothing of the command layer
(finetune.commands, finetune.cli), and no two library modules import each other, directly or in a circle (imports
inside functions count too). Each library module also imports on its own without pulling in a command.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("llama_core", "finetune")
COMMAND_LAYER = ("finetune.commands", "finetune.cli", "finetune.__main__")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(file.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = file
    return out


def _imports(name: str, file: Path, known: set[str]) -> set[str]:
    """The project modules a module imports anywhere in its code (top level or inside functions)."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _library(name: str) -> bool:
    return name not in PACKAGES and not name.startswith(COMMAND_LAYER)


def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, file, set(modules)) for name, file in modules.items()}


def test_llama_core_does_not_import_finetune():
    bad = {m: sorted(i for i in deps if i.startswith("finetune")) for m, deps in graph().items()
           if m.startswith("llama_core")}
    assert not any(bad.values()), bad


def test_library_modules_never_import_the_command_layer():
    bad = {m: sorted(i for i in deps if i.startswith(COMMAND_LAYER)) for m, deps in graph().items() if _library(m)}
    assert not any(bad.values()), bad


def test_no_import_cycles_among_library_modules():
    g = {m: {d for d in deps if _library(d)} for m, deps in graph().items() if _library(m)}
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = "open"
        path.append(m)
        for d in sorted(g[m]):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)


CHECK = """
import importlib, sys
ours = ("llama_core", "finetune")
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ours]:
        del sys.modules[loaded]  # each module imported as in a fresh interpreter (third-party modules stay loaded)
    importlib.import_module(name)
    upward = sorted(m for m in sys.modules if m.startswith(("finetune.commands", "finetune.cli")))
    if upward:
        sys.exit(f"{name} imports the command layer: {upward}")
"""


def test_each_library_module_imports_on_its_own():
    names = sorted(m for m in _modules() if _library(m))
    result = subprocess.run([sys.executable, "-c", CHECK, *names], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
