"""The shape of the code: the project's own imports point one way, with no circle.

    launch, api -> engine.jobs -> engine.reports -> engine.core -> engine.config -> engine.maths
                -> models, data -> internals, startup -> errors

Read from the source with `ast` (every import, function-level ones included), so it needs nothing
installed and fails before a circle is ever imported.
"""

import ast
import os

from helpers import ROOT

PACKAGE = "transfer_engine"  # Every import names the project's modules below it.
PACKAGES = ("engine", "models", "data")
TOP_LEVEL = ("launch", "api", "errors", "internals", "startup")


def project_modules():
    """{module name: path} of every Python module of the project (tests excluded), sub-packages included."""
    modules = {name: os.path.join(ROOT, f"{name}.py") for name in TOP_LEVEL}
    for package in PACKAGES:
        for folder, folders, files in os.walk(os.path.join(ROOT, package)):
            folders[:] = sorted(name for name in folders if not name.startswith(("_", ".")))
            dotted = os.path.relpath(folder, ROOT).replace(os.sep, ".")
            for file in sorted(files):
                if file.endswith(".py"):
                    modules[dotted if file == "__init__.py" else f"{dotted}.{file[:-3]}"] = os.path.join(folder, file)
    return modules


def _unprefixed(name):
    """A module's name in the checkout: transfer_engine.engine.core.loop is engine.loop."""
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


# The layers, highest first: a module imports from its own layer or those below, never from one above.
LAYERS = (("launch", "api"), ("engine.jobs",), ("engine.reports",), ("engine.core",), ("engine.config",),
          ("engine.maths",), ("engine", "models", "data"), ("internals", "startup"), ("errors",))


def layer(name):
    """The index in LAYERS of module `name` (the longest prefix that names a layer)."""
    matches = [(len(prefix), index) for index, names in enumerate(LAYERS) for prefix in names
               if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} is in no layer of tests/test_architecture.py"
    return max(matches)[1]


def test_dependencies_point_one_way():
    graph = import_graph()
    upward = sorted((name, module) for name, imported in graph.items() for module in imported
                    if layer(module) < layer(name))
    assert upward == [], "imports from a higher layer: " + ", ".join(f"{a} -> {b}" for a, b in upward)
    for name, imported in graph.items():
        if name.startswith(("models", "data")):
            assert not any(module.startswith("engine") for module in imported), (name, sorted(imported))
    assert graph["errors"] == set(), "errors.py is the leaf: it imports nothing from the project"
    assert graph["internals"] == {"errors", "startup"} and graph["startup"] == set()
    assert [name for name in graph if "engine.jobs" in graph[name] and name not in ("launch", "api")] == []


def test_the_maths_is_numpy_alone():
    """engine/maths/ is the numpy of calibration and inspection: no TensorFlow, no files; the modules that
    draw and write (engine/reports/, engine/jobs/) call it."""
    for name, path in project_modules().items():
        if name.startswith("engine.maths."):
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                        for alias in node.names}
            imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                         if isinstance(node, ast.ImportFrom) and node.module}
            assert imported <= {"numpy", "dataclasses", "math", "collections"}, (name, imported)


# Library internals have one door, internals.py (startup.py for absl's flag-file hook, before TensorFlow).
INTERNALS_DOORS = ("internals", "startup")
PRIVATE_MODULES = ("keras.src", "tensorflow.python", "tf.python", "absl.flags._")


def private_uses(path, own_names):
    """(line, what) of each use in the file at `path` of a library's internals: an import or attribute path
    through `keras.src` or `tensorflow.python`, or `x._name` where this project defines no `_name` (so
    it is a library object's private attribute, not one of the project's own)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Attribute):
            names = [ast.unparse(node)]
            if node.attr.startswith("_") and not node.attr.startswith("__") and node.attr not in own_names:
                found.append((node.lineno, names[0]))
        else:
            continue
        found.extend((node.lineno, name) for name in names if name.startswith(PRIVATE_MODULES))
    return sorted(set(found))


def own_private_names(paths):
    """Every `_name` the project defines: functions, classes, methods, assigned attributes and names."""
    names = set()
    for path in paths:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {name for name in names if name.startswith("_")}


def test_the_private_use_reader_finds_every_form(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text(
        "import keras\nfrom keras.src import ops\nimport tensorflow.python.util\nfrom tensorflow.python import x\n"
        "def f(optimizer, self):\n    self._mine = optimizer._iterations\n    return keras.src.backend, self._mine, "
        "optimizer.__class__\n"
    )
    assert [what for _, what in private_uses(str(source), {"_mine"})] == [
        "keras.src", "keras.src.ops", "tensorflow.python.util", "tensorflow.python", "tensorflow.python.x",
        "optimizer._iterations", "keras.src", "keras.src.backend"]


def test_library_internals_are_used_in_internals_py_only():
    """The rule of internals.py: a Keras, TensorFlow or absl upgrade that moves a private name breaks one
    file, which names the versions it was checked against."""
    paths = list(project_modules().values()) + [
        os.path.join(ROOT, name) for name in ("api.py", "__init__.py", "transfer_engine.py", "startup.py")
    ] + [os.path.join(ROOT, "scripts", name) for name in sorted(os.listdir(os.path.join(ROOT, "scripts")))
         if name.endswith(".py")]
    own = own_private_names(paths)
    outside = {os.path.relpath(path, ROOT): private_uses(path, own) for path in paths
               if os.path.splitext(os.path.basename(path))[0] not in INTERNALS_DOORS}
    assert {path: uses for path, uses in outside.items() if uses} == {}
