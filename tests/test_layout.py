"""The package layout holds together: every module imports on its own, and no module-level import cycle exists."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PKG = REPO / "cifar_fastai"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(p) for p in PKG.rglob("*.py"))


def module_imports(path: Path) -> set[str]:
    """The package modules `path` imports at module level (imports inside functions run later, on demand)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("cifar_fastai"):
                continue
            for alias in node.names:  # `from . import distributed` imports a module
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cifar_fastai")}
    return found - {name}


def test_no_import_cycles():
    graph = {module_name(p): module_imports(p) for p in PKG.rglob("*.py")}

    graph = {m: {t for t in targets if t in graph} for m, targets in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    # the check itself must be able to fail: two modules that import each other
    (tmp_path / "cifar_fastai").mkdir()
    (tmp_path / "cifar_fastai" / "__init__.py").write_text("")
    (tmp_path / "cifar_fastai" / "a.py").write_text("from .b import x\n")
    (tmp_path / "cifar_fastai" / "b.py").write_text("from .a import y\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path / "cifar_fastai")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", ["cifar_fastai", "cifar_fastai.a", "cifar_fastai.b"])
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "cifar_fastai.a -> cifar_fastai.b -> cifar_fastai.a" in str(e)
    else:
        raise AssertionError("the cycle was not found")


def test_every_module_imports_on_its_own():
    # one fresh interpreter; the package is dropped from sys.modules before each import, so each module is imported
    # first, as a user's `import cifar_fastai.x.y` would (third-party libraries stay loaded: seconds, not minutes)
    code = f"""
import importlib, sys
failed = []
for name in {MODULES!r}:
    for m in [m for m in sys.modules if m == "cifar_fastai" or m.startswith("cifar_fastai.")]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{{name}}: {{type(e).__name__}}: {{e}}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(MODULES) > 40, "every module of the package was tried"
