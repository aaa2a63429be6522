"""The project's layers, as docs/DESIGN.md draws them, checked on the source.

Every `import` counts, also the ones inside functions: a lazy import still ties two modules
together, and a circle through one only waits for the wrong call order to fail.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("db", "annotate", "rlhf", "storyworld")
# The training stack. `datasets` is not here: annotate imports it on use, for `--format hf` and StoryReasoning.
HEAVY = ("torch", "torchvision", "transformers", "trl", "peft", "open_clip", "accelerate", "sentence_transformers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at any depth, as dotted names (`from a import b` gives `a` and `a.b`)."""
    names: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def graph() -> dict[str, set[str]]:
    """Our modules → the modules of ours each one imports (a package's `__init__` counts as the package)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    files["app"] = ROOT / "app.py"
    return {mod: {name for name in imports_of(path) if name in files and name != mod} for mod, path in files.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None. Plain depth-first search."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_of_reads_lazy_and_relative_imports(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "pkg").mkdir()
    mod = tmp_path / "pkg" / "mod.py"
    mod.write_text("import os\n\ndef f():\n    from pkg.other import thing\n    from . import sibling\n")
    assert {"os", "pkg.other", "pkg.other.thing", "pkg", "pkg.sibling"} <= imports_of(mod)


def test_no_import_circle():
    """No module of ours reaches itself through imports, lazy ones included (e.g. policy ↔ reward_model)."""
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " → ".join(cycle or [])


@pytest.mark.parametrize(
    "package, forbidden, why",
    [
        ("db", ("annotate", "rlhf", "storyworld", "app", *HEAVY), "db is the bottom layer: SQLAlchemy only"),
        ("annotate", ("rlhf", "app", *HEAVY), "annotate must run on a labeling server without the training stack"),
        ("storyworld", ("db", "annotate", "rlhf", "app"), "storyworld imports nothing else of storypref"),
        ("rlhf", ("storyworld", "app"), "rlhf never reads storyworld's hidden truth"),
    ],
)
def test_layers_point_one_way(package, forbidden, why):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imports_of(path):
            if name.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, f"{why}: " + "; ".join(sorted(set(bad)))


def test_every_rlhf_module_imports_alone():
    """Each module imports in a fresh interpreter on its own, whatever was imported before it."""
    modules = sorted(m for m in graph() if m.startswith("rlhf.") and m != "rlhf.__main__")
    run = lambda m: subprocess.run([sys.executable, "-c", f"import {m}"], cwd=ROOT, capture_output=True, text=True, timeout=120)  # noqa: E731
    with ThreadPoolExecutor(4) as pool:
        failed = [f"import {m} alone failed:\n{done.stderr[-1500:]}" for m, done in zip(modules, pool.map(run, modules)) if done.returncode]
    assert not failed, "\n".join(failed)
