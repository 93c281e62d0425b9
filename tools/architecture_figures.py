"""The architecture figures of a checkout, by the rules of tests/test_architecture.py: import
circles, upward imports, family-name comparisons outside tinyfusion/families/, code importing a
root script, and module and script sizes.

    python tools/architecture_figures.py             # this checkout
    python tools/architecture_figures.py OTHER_ROOT  # e.g. a `git worktree` of an older commit
"""
import argparse
import ast
import importlib.util
import os

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_rules():
    """tests/test_architecture.py as a module (its import reader and its rules, not a copy)."""
    spec = importlib.util.spec_from_file_location("architecture", os.path.join(HERE, "tests", "test_architecture.py"))
    rules = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rules)
    return rules


def main(root):
    rules = load_rules()
    graph = rules.import_graph(root)
    scripts = {path for path in graph if "/" not in path and path != "models.py"}
    upward, script_imports = rules.upward_imports(graph), rules.script_imports(graph)
    comparisons = {}
    for path in graph:
        if not path.startswith(rules.FAMILY_MODULES):
            lines = rules.family_name_comparisons(ast.parse(open(os.path.join(root, path)).read()))
            if lines:
                comparisons[path] = lines
    sizes = {path: sum(1 for _ in open(os.path.join(root, path))) for path in graph}
    library = {path: lines for path, lines in sizes.items() if path.startswith("tinyfusion/")}
    print(f"import circles: {rules.import_circles(graph)}")
    print(f"upward imports ({len(upward)}): {upward}")
    print(f"family-name comparisons outside the family modules: "
          f"{sum(map(len, comparisons.values()))} lines in {sorted(comparisons)}")
    print(f"code importing a root script ({len(script_imports)}): {script_imports}")
    largest = max(library.items(), key=lambda item: item[1])
    print(f"library modules: {len(library)}, median {sorted(library.values())[len(library) // 2]} lines, "
          f"largest {largest[0]} ({largest[1]})")
    print(f"script lines: {sum(sizes[path] for path in scripts)} in all: "
          + ", ".join(f"{path} {sizes[path]}" for path in sorted(scripts)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default=HERE, help="the checkout to measure (default: this one)")
    root = os.path.abspath(parser.parse_args().root)
    if not os.path.isfile(os.path.join(root, "models.py")):
        parser.error(f"{root} is not a TinyFusion checkout (it has no models.py)")  # else every figure would read 0
    main(root)
