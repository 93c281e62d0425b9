"""The shape of the code, checked from its imports (read with ast; nothing is imported or run).

Layers, lowest first: `models.py` <- the maths (`diffusion/`, `transport/`: no flags, no library)
<- the library (`tinyfusion/`) <- what users run (root scripts, `bench/`, `tools/`). An import
may only point to its own layer or a lower one; no module imports a root script; no import
circle; and only the family modules (`tinyfusion/families/`) compare a family's name.
"""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILY_MODULES = ("tinyfusion/families/",)
# a family's name or --model prefix as a string constant ("SiT", "DiT-", ...)
FAMILY_NAME = re.compile(r"^(DiT|SiT)-?$")


def source_files(root=ROOT):
    """Every .py of the code (tests excluded), as paths relative to the root."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__", "outputs")]
        found += [os.path.relpath(os.path.join(folder, name), root) for name in files if name.endswith(".py")]
    return sorted(found)


def module_name(path):
    name = path[:-3].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def layer(path):
    if path == "models.py":
        return 0
    if path.startswith(("diffusion/", "transport/")):
        return 1
    if path.startswith("tinyfusion/"):
        return 2
    return 3  # root scripts, bench/, tools/


def imported_modules(tree, path, known):
    """The modules of this code base that `tree` imports (anywhere: module level or in a function)."""
    package = module_name(path).rsplit(".", 1)[0] if "/" in path else ""
    if path.endswith("__init__.py"):
        package = module_name(path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:  # `from a.b import c`: c may be a name in a.b
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph(root=ROOT):
    """{file: [files it imports]} of the code under `root` (tools/architecture_figures.py reads any checkout)."""
    files = source_files(root)
    known = {module_name(path): path for path in files}
    edges = {}
    for path in files:
        tree = ast.parse(open(os.path.join(root, path)).read(), path)
        own = module_name(path)
        edges[path] = sorted({known[name] for name in imported_modules(tree, path, known) if name != own})
    return edges


def upward_imports(graph):
    return [f"{path} -> {target}" for path, targets in graph.items() for target in targets
            if layer(target) > layer(path)]


def script_imports(graph):
    scripts = {path for path in graph if "/" not in path and path != "models.py"}
    return [f"{path} -> {target}" for path, targets in graph.items() for target in targets if target in scripts]


def import_circles(graph):
    state, circles = {}, []

    def visit(path, trail):
        state[path] = "open"
        for target in graph[path]:
            if state.get(target) == "open":
                circles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[path] = "done"

    for path in graph:
        if path not in state:
            visit(path, [path])
    return circles


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_imports_point_down_the_layers(graph):
    assert upward_imports(graph) == []


def test_no_module_imports_a_root_script(graph):
    assert script_imports(graph) == []


def test_no_import_circle(graph):
    assert import_circles(graph) == []


def family_name_comparisons(tree):
    """Lines that compare with a family name or test a --model prefix ("SiT", "DiT-")."""
    def is_family_constant(node):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(is_family_constant(element) for element in node.elts)
        return isinstance(node, ast.Constant) and isinstance(node.value, str) and bool(FAMILY_NAME.match(node.value))

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(map(is_family_constant, [node.left, *node.comparators])):
            lines.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith") and any(map(is_family_constant, node.args))):
            lines.append(node.lineno)
    return lines


def test_only_the_family_modules_compare_family_names(graph):
    found = {}
    for path in graph:
        if path.startswith(FAMILY_MODULES):
            continue
        lines = family_name_comparisons(ast.parse(open(os.path.join(ROOT, path)).read(), path))
        if lines:
            found[path] = lines
    assert found == {}


def test_the_checks_see_what_they_look_for():
    """Each rule on a constructed example (so that a broken walker cannot pass by finding nothing)."""
    tree = ast.parse("if name.startswith('SiT-'):\n    pass\nif family == 'DiT':\n    pass\nx = 'DiT' in y\n")
    assert family_name_comparisons(tree) == [1, 3, 5]
    assert family_name_comparisons(ast.parse("if name == 'DiT-XL/2':\n    pass\n")) == []
    known = {"tinyfusion", "tinyfusion.io", "tinyfusion.io.vae", "models", "sample"}
    tree = ast.parse("from tinyfusion.io import vae\nimport sample\n\ndef f():\n    from models import DiT\n")
    assert imported_modules(tree, "tinyfusion/x.py", known) == {"tinyfusion.io", "tinyfusion.io.vae", "sample",
                                                                 "models"}
    assert layer("transport/loss.py") == 1 and layer("tinyfusion/io/vae.py") == 2 and layer("bench/harness.py") == 3
    toy = {"models.py": [], "transport/loss.py": ["tinyfusion/flags.py"], "tinyfusion/flags.py": ["tinyfusion/a.py"],
           "tinyfusion/a.py": ["tinyfusion/flags.py", "train.py"], "train.py": ["models.py"]}
    assert upward_imports(toy) == ["transport/loss.py -> tinyfusion/flags.py", "tinyfusion/a.py -> train.py"]
    assert script_imports(toy) == ["tinyfusion/a.py -> train.py"]
    assert import_circles(toy) == [["tinyfusion/flags.py", "tinyfusion/a.py", "tinyfusion/flags.py"]]
