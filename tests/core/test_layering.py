"""The house's arrows point one way: parts import the core, the core imports no part.

``edgeserve/`` (the core) may not import ``edgeserve.converters``, ``edgeserve.device_agent``,
``edgeserve.fleet`` or ``edgeserve.demo``, not even lazily inside a function or under
``TYPE_CHECKING``: a device install has no converter, and a core that reaches up into a part it
happens to find installed is a core that breaks when it is not. The three parts never import each
other or the demo. Only ``demo/`` ties them together.

The CLI's table of lazy groups names the parts' modules as *strings*; that is not an import and is
not seen here (the modules are parsed, never imported).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# folder -> the import name it installs under (setup.py's ROOTS)
FOLDERS = {"edgeserve": "edgeserve", "converters": "edgeserve.converters",
           "device_agent": "edgeserve.device_agent", "fleet": "edgeserve.fleet",
           "demo": "edgeserve.demo", "hw-profiles": "edgeserve.hw_profiles"}
PARTS = ("edgeserve.converters", "edgeserve.device_agent", "edgeserve.fleet", "edgeserve.demo")
# what each folder must not import
FORBIDDEN = {
    "edgeserve": PARTS,
    "hw-profiles": PARTS,  # data
    "converters": ("edgeserve.device_agent", "edgeserve.fleet", "edgeserve.demo"),
    # pydantic costs a device ~15 MB of RSS: the agent's documents are msgspec structs
    "device_agent": ("edgeserve.converters", "edgeserve.fleet", "edgeserve.demo", "pydantic",
                     "pydantic_core"),
    "fleet": ("edgeserve.converters", "edgeserve.device_agent", "edgeserve.demo"),
}
GENERATED = ("_grpc_gen",)


def _module_name(folder: str, path: Path) -> tuple[str, bool]:
    """The import name of ``path`` under ``folder``, and whether it is a package's __init__."""
    parts = path.relative_to(REPO / folder).with_suffix("").parts
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join((FOLDERS[folder], *parts)), is_package


def _imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, absolute module) for every import in ``tree``, relative ones resolved.

    ``from X import y`` yields both ``X`` and ``X.y``: ``y`` may be a submodule
    (``from edgeserve import fleet``)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            yield node.lineno, source
            for alias in node.names:
                yield node.lineno, f"{source}.{alias.name}"


def _bare(name: str) -> str:
    """A part imported by its folder name (``import fleet``) is still that part."""
    for folder, installed in FOLDERS.items():
        if folder != "edgeserve" and (name == folder or name.startswith(f"{folder}.")):
            return installed + name[len(folder):]
    return name


def _violations(folder: str) -> list[str]:
    found: dict[str, str] = {}  # one finding per import statement
    for path in sorted((REPO / folder).rglob("*.py")):
        if any(g in path.parts for g in GENERATED):
            continue
        module, is_package = _module_name(folder, path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, name in _imported(tree, module, is_package):
            name = _bare(name)
            for part in FORBIDDEN[folder]:
                if name == part or name.startswith(f"{part}."):
                    found.setdefault(f"{path.relative_to(REPO)}:{line}", name)
    return [f"{where} imports {name}" for where, name in sorted(found.items())]


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_point_one_way(folder: str) -> None:
    assert (REPO / folder).is_dir()
    violations = _violations(folder)
    assert not violations, f"{folder}/ imports what it must not:\n" + "\n".join(violations)


def test_every_code_folder_is_checked() -> None:
    """A new part (a folder setup.py maps to ``edgeserve.*``) gets rules here too."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    roots = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                 if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "ROOTS" for t in node.targets))
    assert {folder: name for name, folder in roots.items()} == FOLDERS


def test_the_checker_sees_relative_lazy_and_from_imports() -> None:
    """The checker itself: the spellings a core module could use to reach a part."""
    source = ("def f():\n    from .fleet import store\n"
              "from edgeserve import device_agent\n"
              "import edgeserve.converters.cli\n"
              "if True:\n    from ..demo.app import demo\n")
    names = {n for _, n in _imported(ast.parse(source), "edgeserve.contract.x", False)}
    names |= {n for _, n in _imported(ast.parse(source), "edgeserve.cli", False)}
    assert {"edgeserve.fleet", "edgeserve.device_agent", "edgeserve.converters.cli",
            "edgeserve.demo.app"} <= names
    assert _bare("fleet.store") == "edgeserve.fleet.store"


def _module_graph(folder: str) -> dict[str, set[str]]:
    """Module -> the modules of the same folder it imports (lazily and for typing too)."""
    paths = [p for p in sorted((REPO / folder).rglob("*.py"))
             if not any(g in p.parts for g in GENERATED)]
    modules = dict(_module_name(folder, p) for p in paths)
    graph: dict[str, set[str]] = {}
    for path in paths:
        module, is_package = _module_name(folder, path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[module] = {name for _, name in _imported(tree, module, is_package)
                         if name in modules and name != module and not modules[name]}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("folder", ["edgeserve", "converters", "device_agent", "fleet", "demo"])
def test_no_module_imports_itself_round_a_cycle(folder: str) -> None:
    """Modules of one part form no import cycle (e.g. packaging -> pipeline -> packaging), not
    even through lazy or typing-only imports: each concept depends on the ones below it."""
    cycles = _cycles(_module_graph(folder))
    assert not cycles, f"{folder}/ has import cycles: {cycles}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The checker itself: a three-module loop is reported, a chain is not."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}}) == []
