"""The package's import structure: no module imports itself back through others (module-level and
function-level imports alike), config.py is the ground floor, and the method object is built at entry points only.
Read from the source with `ast`; nothing is imported."""

import ast
import os

import pytest

PACKAGE = "siim_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

# where get_method(config) may be called: the registry, the run's entry points, and the loader of a recorded run
GET_METHOD_ALLOWED = {
    "siim_jax.methods",  # the registry itself
    "siim_jax.train.loop",  # train_and_evaluate: the trainer's top-level function
    "siim_jax.eval.fewshot",  # evaluate_few_shot: the few-shot command
    "siim_jax.import_weights",
    "siim_jax.bench_step",
    "siim_jax.aot",
    "siim_jax.tools.visualize",
    "siim_jax.interop.convert",  # load_workdir_state: a recorded run's config enters here
}


def module_files(root: str = ROOT, package: str = PACKAGE) -> dict[str, str]:
    """{dotted module name: file path} of every .py file of the package; a package is named by its __init__."""
    modules = {}
    for folder, _, files in os.walk(root):
        relative = os.path.relpath(folder, root)
        prefix = package if relative == "." else f"{package}.{relative.replace(os.sep, '.')}"
        for name in files:
            if name.endswith(".py"):
                modules[prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"] = os.path.join(folder, name)
    return modules


def is_package(modules: dict, name: str) -> bool:
    return modules.get(name, "").endswith("__init__.py")


def imported_modules(modules: dict, name: str, tree: ast.AST) -> set[str]:
    """The package's modules that `name` imports anywhere in its file.

    `from a.b import c` imports a.b.c when that is a module, else a.b; `import a.b` imports a.b. Importing a
    module also runs the __init__ of every package above it, so those count too, except packages that contain
    `name` itself (Python has already run them when `name` is imported: a submodule importing a sibling is no
    import of its own __init__; an explicit `from own_package import x` still is).
    """
    own_package = name if is_package(modules, name) else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = own_package.split(".")[: len(own_package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                child = f"{source}.{alias.name}"
                targets.add(child if child in modules else source)
    edges = set()
    for target in targets:
        if target not in modules:
            continue
        edges.add(target)
        parts = target.split(".")
        for depth in range(1, len(parts)):
            ancestor = ".".join(parts[:depth])
            if ancestor in modules and not (name == ancestor or name.startswith(ancestor + ".")):
                edges.add(ancestor)
    edges.discard(name)
    return edges


def import_graph(root: str = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """{module: the package's modules it imports}."""
    modules = module_files(root, package)
    graph = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            graph[name] = imported_modules(modules, name, ast.parse(f.read(), path))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, white / grey / black)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "grey"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "grey":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = "black"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the graph was read, not left empty
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("files, cycle", [
    # a module importing another that imports it back (here inside a function)
    ({"__init__.py": "", "a.py": "import pkg.b\n", "b.py": "def f():\n    from pkg.a import x\n"},
     ["pkg.a", "pkg.b", "pkg.a"]),
    # a submodule importing its own package's __init__, which imports the submodule
    ({"__init__.py": "from pkg.a import x\n", "a.py": "from pkg import y\n"}, ["pkg", "pkg.a", "pkg"]),
    # through a package __init__ that re-exports: b imports pkg.sub (running its __init__), which imports c -> b
    ({"__init__.py": "", "b.py": "from pkg.sub.d import z\n", "sub/__init__.py": "from pkg.sub.c import w\n",
      "sub/c.py": "import pkg.b\n", "sub/d.py": ""}, ["pkg.b", "pkg.sub", "pkg.sub.c", "pkg.b"]),
])
def test_the_cycle_check_finds_planted_cycles(tmp_path, files, cycle):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert find_cycle(import_graph(str(tmp_path), "pkg")) == cycle


def test_a_package_init_importing_its_submodules_is_no_cycle(tmp_path):
    (tmp_path / "__init__.py").write_text("from pkg.a import x\nfrom pkg.b import y\n")
    (tmp_path / "a.py").write_text("from pkg.b import y\n")
    (tmp_path / "b.py").write_text("import os\n")
    assert find_cycle(import_graph(str(tmp_path), "pkg")) is None


def test_config_is_the_ground_floor():
    assert import_graph()["siim_jax.config"] == set()


def test_get_method_is_called_at_entry_points_only():
    modules = module_files()
    callers = set()
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        if "get_method" in names | defined:
            callers.add(name)
    assert callers <= GET_METHOD_ALLOWED, f"get_method outside the entry points: {sorted(callers - GET_METHOD_ALLOWED)}"
    assert "siim_jax.train.loop" in callers
