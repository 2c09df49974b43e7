"""The shape of the code: the project's own imports point one way, with no circle.

    launch -> engine (jobs -> train, compare, benchmark -> loop, trainer, feature cache -> assembly)
           -> models, data -> internals -> errors

Read from the source with `ast` (every import, function-level ones included), so it needs nothing
installed and fails before a circle is ever imported.
"""

import ast
import os

from helpers import ROOT

PACKAGE = "transfer_engine"  # Every import names the project's modules below it.
PACKAGES = ("engine", "models", "data")
TOP_LEVEL = ("launch", "errors", "internals")


def project_modules():
    """{module name: path} of every Python module of the project (tests excluded)."""
    modules = {name: os.path.join(ROOT, f"{name}.py") for name in TOP_LEVEL}
    for package in PACKAGES:
        for file in sorted(os.listdir(os.path.join(ROOT, package))):
            if file.endswith(".py"):
                name = package if file == "__init__.py" else f"{package}.{file[:-3]}"
                modules[name] = os.path.join(ROOT, package, file)
    return modules


def _unprefixed(name):
    """A module's name in the checkout: transfer_engine.engine.loop is engine.loop."""
    return name.removeprefix(PACKAGE + ".")


def imports_of(path, modules):
    """The project modules that the module at `path` imports (`from engine import x` counts as
    engine.x when that is a module, else as engine)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [_unprefixed(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            module = _unprefixed(node.module)
            submodules = [_unprefixed(f"{node.module}.{alias.name}") for alias in node.names]
            names = [name for name in submodules if name in modules]
            if len(names) < len(submodules):  # Some names are attributes of node.module itself.
                names.append(module)
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph():
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph):
    """A list of modules that import each other in a circle, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return stack[stack.index(child):] + [child]
            if child not in state:
                cycle = visit(child)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_reader_sees_imports_of_every_form(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text(
        "from transfer_engine import errors\nfrom transfer_engine.engine import loop, config as c\nfrom transfer_engine.models.modes import MODES\n"
        "def f():\n    from transfer_engine.data import pipeline\n"
    )
    modules = {name: "" for name in ("errors", "engine", "engine.loop", "engine.config", "models.modes",
                                     "data", "data.pipeline")}
    assert imports_of(str(source), modules) == {"errors", "engine.loop", "engine.config", "models.modes",
                                                "data.pipeline"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle():
    graph = import_graph()
    assert len(graph) > 20, sorted(graph)  # The reader found the project.
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_dependencies_point_one_way():
    graph = import_graph()
    for name, imported in graph.items():
        if name.startswith(("models", "data")):
            assert not any(module.startswith("engine") for module in imported), (name, sorted(imported))
        assert "launch" not in imported, name
    assert graph["errors"] == set(), "errors.py is the leaf: it imports nothing from the project"
    assert graph["internals"] == {"errors"}
    below_jobs = [name for name in graph if name not in ("launch", "engine.jobs")]
    assert [name for name in below_jobs if "engine.jobs" in graph[name]] == []
