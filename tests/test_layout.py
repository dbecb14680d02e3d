"""The package's structure, checked from its source: no import cycle, no private name taken from
another module, and arrows that point down the stages (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "kdcache"

# Bottom to top. A module may import from its own stage or any stage below it, never above.
STAGES = ["base", "data", "cache", "models", "learn", "tools", "api", "cli"]
BASE = {"kdcache.errors", "kdcache.runtime", "kdcache.version"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(mod: str) -> str:
    if mod in BASE:
        return "base"
    if mod in ("kdcache", "kdcache.__main__"):
        return "api" if mod == "kdcache" else "cli"
    return mod.split(".")[1]


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken, line) for every import in the file, at any depth."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("kdcache"):
                continue
            names = [a.name for a in node.names]
            # "from . import x" names a module, not an attribute
            subs = [f"{target}.{n}" for n in names if (PKG.parent / f"{target}.{n}".replace(".", "/")).with_suffix(".py").exists()
                    or (PKG.parent / f"{target}.{n}".replace(".", "/")).is_dir()]
            if subs:
                out += [(s, [], node.lineno) for s in subs]
            else:
                out.append((target, names, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("kdcache")]
    return out


def graph() -> dict[str, list[tuple[str, list[str], int]]]:
    return {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def test_no_import_cycle_inside_the_package():
    g = {m: sorted({t for t, _, _ in edges if t != m}) for m, edges in graph().items()}
    # Package faces (__init__) that only hold the package's docstring do not count as nodes in a cycle.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in g.get(m, []):
            if t not in g:
                continue
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_import_inside_the_package_names_a_module_that_exists():
    # a relative import that climbs to the wrong level fails only when its function first runs
    mods = set(graph())
    bad = [f"{m}:{line} imports {t}, which is no module of the package" for m, edges in graph().items()
           for t, _, line in edges if t not in mods]
    assert not bad, "\n".join(bad)


def test_no_private_name_is_imported_from_another_module():
    bad = [f"{m}:{line} takes {n} from {t}" for m, edges in graph().items() for t, names, line in edges
           for n in names if n.startswith("_") and not n.startswith("__") and t != m]
    assert not bad, "\n".join(bad)


def test_imports_point_down_the_stages():
    bad = []
    for m, edges in graph().items():
        here = STAGES.index(stage_of(m))
        for t, _, line in edges:
            if t == "kdcache" and m != "kdcache":
                bad.append(f"{m}:{line} imports the package face (kdcache/__init__.py); import the module itself")
            elif STAGES.index(stage_of(t)) > here:
                bad.append(f"{m}:{line} ({stage_of(m)}) imports {t} ({stage_of(t)}), a stage above it")
    assert not bad, "\n".join(bad)


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a made-up package with a cycle and an upward arrow trips them."""
    pkg = tmp_path / "kdcache"
    (pkg / "data").mkdir(parents=True)
    (pkg / "learn").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "learn" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("from ..learn.b import thing, _hidden\n")
    (pkg / "learn" / "b.py").write_text("from ..data.a import other\n")
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    import pytest

    with pytest.raises(AssertionError, match="cycles"):
        test_no_import_cycle_inside_the_package()
    with pytest.raises(AssertionError, match="_hidden"):
        test_no_private_name_is_imported_from_another_module()
    with pytest.raises(AssertionError, match="a stage above it"):
        test_imports_point_down_the_stages()


MAX_LINES = 100  # a function longer than a screen and a half is several ideas; kernels are the exception


def long_functions(root=None) -> list[str]:
    root = root or PKG
    out = []
    for path in sorted(root.rglob("*.py")):
        if "kernels" in path.parts:
            continue  # a Triton kernel is one launch: splitting it costs registers and readability alike
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_outside_the_kernels_is_longer_than_100_lines(tmp_path):
    assert not long_functions(), "\n".join(long_functions())
    (tmp_path / "long.py").write_text("def f():\n" + "    x = 1\n" * 120)
    assert long_functions(tmp_path) == [f"{tmp_path.name}/long.py:1 f (121 lines)"]
