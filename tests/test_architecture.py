"""The layout's rules (docs/architecture.md), read from the source with `ast`: nothing is imported or run.

- no import circle among the project's modules (a package's `__init__` counts: importing `a.b.c` runs `a`
  and `a.b` first, unless the importer already lives inside them);
- no module imports a private name (`_x`) of another module, or reads one through a module alias;
- click only in the command-line tools: the top-level scripts, `bench/` and `training/cli/`;
- nothing outside a registry's own package compares anything with a name it registers (`arch == "adm"`,
  `kind in ("pfgm", "vp")`) or tests an object against a class it registers (`cls is DhariwalUNet`,
  `isinstance(net, EDM2UNet)`): what the rest of the code needs, the registered thing declares;
- no library code reseeds a global random generator (`torch.manual_seed`, `np.random.seed`, ...): library
  functions take a generator; only torch_utils/rng.py touches the state of torch's generators (to hand network
  code an explicit one for a block, `rng.network_draws`, and to replay draws).
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


# Each registry, by the package that is its home, with every name it registers (keys and class names).
def registries() -> dict[str, set[str]]:
    from training import datasets, losses, metrics, networks, preconditioners, samplers

    def named(registry: dict) -> set[str]:
        return set(registry) | {getattr(v, "__name__", None) for v in registry.values()} - {None}

    return {
        "training/networks/": named(networks.NETWORKS) | set(networks.presets()),
        "training/preconditioners/": named(preconditioners.PRECONDITIONERS),
        "training/losses/": named(losses.LOSSES),
        "training/samplers/": set(samplers.SOLVERS),
        "training/metrics/": set(metrics.METRICS),
        "training/datasets/": set(datasets.SOURCES),
    }


# Variables of other vocabularies whose values coincide with registered names: EDM's sampler ablations name their
# discretisations, schedules and scalings after VP / VE, Score SDE's SDEs are 'vp' and 've', and an ODE method is
# 'euler'. Comparing them is not switching on a preconditioner, loss or solver.
OTHER_VOCABULARIES = {"discretization", "schedule", "scaling", "sde", "method"}


def _strings(node: ast.AST):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        for element in node.elts:
            yield from _strings(element)


def _identifier(node: ast.AST) -> str | None:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def registered_name_tests(path: Path, registered: dict[str, set[str]], rel: str) -> list[str]:
    """Comparisons with a name of a registry, and class tests against a registered class, outside its home."""
    foreign = set().union(*(names for home, names in registered.items() if not rel.startswith(home)))
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_identifier(o) in OTHER_VOCABULARIES for o in operands):
                continue
            hits = {s for o in operands for s in _strings(o)} | {_identifier(o) for o in operands if isinstance(
                next(iter(node.ops)), (ast.Is, ast.IsNot))}
            hits &= foreign
        elif isinstance(node, ast.Call) and _identifier(node.func) in ("isinstance", "issubclass") and len(node.args) == 2:
            classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            hits = {_identifier(c) for c in classes} & foreign
        else:
            continue
        found += [f"{rel}:{node.lineno}: {name}" for name in sorted(hits)]
    return found


def test_no_code_switches_on_a_registered_name():
    registered = registries()
    found = []
    for path in MODULES.values():
        rel = path.relative_to(ROOT).as_posix()
        found += registered_name_tests(path, registered, rel)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ("x = 1 if kind == 'PFGMPrecond' else 2\n", ["PFGMPrecond"]),
    ("x = arch in ('ddpmpp', 'other')\n", ["ddpmpp"]),
    ("x = cls is DhariwalUNet\n", ["DhariwalUNet"]),
    ("x = isinstance(net, (int, networks.EDM2UNet))\n", ["EDM2UNet"]),
    ("x = name != 'pfgm_rk45'\n", ["pfgm_rk45"]),
    ("x = loss == 'edm2'\n", ["edm2"]),
    ("x = kind in ('a', 'b')\n", []),
    ("x = discretization == 'vp'\n", []),
])
def test_the_registered_name_check_sees_comparisons(tmp_path, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert [hit.rsplit(": ", 1)[1] for hit in registered_name_tests(path, registries(), "elsewhere/probe.py")] == expected
    # Inside the registry's own package the same code is allowed.
    assert not registered_name_tests(path, {home: set() for home in registries()} | {"training/": set().union(
        *registries().values())}, "training/probe.py")


RESEEDING = {("torch", "manual_seed"), ("cuda", "manual_seed"), ("cuda", "manual_seed_all"), ("random", "manual_seed"),
             ("random", "seed"), ("np", "seed"), ("numpy", "seed")}


def global_reseeding(path: Path) -> list[str]:
    """Calls such as torch.manual_seed(...), torch.cuda.manual_seed_all(...), np.random.seed(...), random.seed(...)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            owner_name = _identifier(owner)
            if owner_name == "random" and isinstance(owner, ast.Attribute):  # np.random.seed, torch.random.manual_seed
                owner_name = _identifier(owner.value) if node.func.attr == "seed" else "random"
            if (owner_name, node.func.attr) in RESEEDING:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node.func)}")
    return found


def test_no_library_code_reseeds_a_global_generator():
    found = [hit for path in MODULES.values() for hit in global_reseeding(path)]
    assert not found, found


@pytest.mark.parametrize("source, expected", [
    ("torch.manual_seed(0)\n", 1), ("torch.cuda.manual_seed_all(0)\n", 1), ("np.random.seed(0)\n", 1),
    ("random.seed(0)\n", 1), ("torch.random.manual_seed(0)\n", 1),
    ("torch.Generator().manual_seed(0)\n", 0), ("g.manual_seed(0)\n", 0),
])
def test_the_reseeding_check_sees_global_seeding(tmp_path, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert len(global_reseeding(path)) == expected


STATE_CALLS = {"get_rng_state", "set_rng_state", "fork_rng", "default_generator", "default_generators"}


def generator_state_uses(path: Path) -> list[str]:
    """Reads or writes of the state of torch's global generators (`torch.set_rng_state`, `fork_rng`, ...)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in STATE_CALLS:
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_only_the_rng_module_touches_the_global_generators():
    rng_module = ROOT / "torch_utils" / "rng.py"
    found = [hit for path in MODULES.values() if path != rng_module for hit in generator_state_uses(path)]
    assert not found, found
    assert generator_state_uses(rng_module)  # the check sees the uses where they are
