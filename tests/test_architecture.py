"""The layout's rules (docs/architecture.md), read from the source with `ast`: nothing is imported or run.

- no import circle among the project's modules (a package's `__init__` counts: importing `a.b.c` runs `a`
  and `a.b` first, unless the importer already lives inside them);
- no module imports a private name (`_x`) of another module, or reads one through a module alias;
- click only in the command-line tools: the top-level scripts, `bench/` and `training/cli/`;
- no comparison with a preconditioner's class name (`... == "PFGMPrecond"`): what the loop needs, a
  preconditioner declares.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "torch_utils", "dnnlib")
SCRIPTS = ("train.py", "generate.py", "fid.py", "dataset_tool.py", "reconstruct_phema.py")
CLI_PLACES = ("training/cli/", "bench/", *SCRIPTS)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files() -> dict[str, Path]:
    """Every project module (library, scripts, bench), by dotted name."""
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    files += [ROOT / s for s in SCRIPTS] + sorted((ROOT / "bench").glob("*.py"))
    return {module_name(p): p for p in files}


MODULES = project_files()


def is_project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES or name in MODULES


def resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module of a `from ... import` statement."""
    if not node.level:
        return node.module or ""
    is_package = MODULES[importer].name == "__init__.py"
    base = importer.split(".")[: len(importer.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str) -> list[tuple[str, list[str], ast.AST]]:
    """(module, imported names or [], node) for every import statement of a module, at any depth."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((resolve(name, node), [alias.name for alias in node.names], node))
    return found


def edges(name: str) -> set[str]:
    """The project modules that importing `name` imports first (its targets and their packages)."""
    own_packages = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")) + 1)}
    targets = set()
    for module, names, _ in imports(name):
        if not is_project(module):
            continue
        targets.add(module)
        targets.update(f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES)
    result = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            ancestor = ".".join(parts[:i])
            if ancestor in MODULES and ancestor not in own_packages:
                result.add(ancestor)
    result.discard(name)
    return result


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle():
    graph = {name: edges(name) for name in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_circle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def private_uses(name: str) -> list[str]:
    """`from project.module import _x`, and `alias._x` where alias is a project module."""
    found, aliases = [], set()
    for module, names, node in imports(name):
        if not is_project(module):
            continue
        if isinstance(node, ast.Import):
            aliases.update(a.asname or a.name.split(".")[0] for a in node.names)
        for alias in getattr(node, "names", []):
            if isinstance(node, ast.ImportFrom) and f"{module}.{alias.name}" in MODULES:
                aliases.add(alias.asname or alias.name)
            elif isinstance(node, ast.ImportFrom) and alias.name.startswith("_") and not alias.name.startswith("__"):
                found.append(f"{name}: from {module} import {alias.name}")
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_private_name_crosses_a_module():
    found = [use for name in MODULES for use in private_uses(name)]
    assert not found, "\n".join(found)


def test_click_only_in_command_line_tools():
    offenders = []
    for name, path in MODULES.items():
        rel = path.relative_to(ROOT).as_posix()
        uses_click = any(m.split(".")[0] == "click" for m, _, _ in imports(name))
        if uses_click and not rel.startswith(CLI_PLACES):
            offenders.append(rel)
    assert not offenders, f"click imported by library modules: {offenders}"


def precond_name_tests(path: Path) -> list[str]:
    """Comparisons of anything with a string naming a preconditioner class ('...Precond')."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                if isinstance(operand, ast.Constant) and isinstance(operand.value, str) and operand.value.endswith("Precond"):
                    found.append(f"{path}:{node.lineno}")
    return found


def test_no_code_switches_on_a_preconditioner_class_name():
    registry = ROOT / "training" / "preconditioners" / "__init__.py"
    found = [hit for path in MODULES.values() if path != registry for hit in precond_name_tests(path)]
    assert not found, found


@pytest.mark.parametrize("source, expected", [
    ("x = 1 if kind == 'PFGMPrecond' else 2\n", 1),
    ("x = kind in ('a', 'b')\n", 0),
])
def test_the_class_name_check_sees_comparisons(tmp_path, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert len(precond_name_tests(path)) == expected
