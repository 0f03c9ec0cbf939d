"""The folder tree is the architecture: imports point one way, with no circle and no private names.

Each room may import only the rooms below it. The check reads every module's imports with
`ast` (top-level and inside functions), so it cannot be fooled by lazy imports.
"""

import ast
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fwllm"

# room -> the rooms it may import (itself included)
ALLOWED = {
    "core": {"core"},
    "kernels": {"core", "kernels"},
    "io": {"core", "io"},
    "arch": {"core", "io", "arch"},
    "data": {"core", "io", "arch", "data"},
    "solvers": {"core", "kernels", "io", "arch", "data", "solvers"},
    "methods": {"core", "kernels", "io", "arch", "data", "solvers", "methods"},
    "mergekit_glue": {"core", "kernels", "io", "arch", "data", "solvers", "methods", "mergekit_glue"},
    "evaluation": {"core", "io", "arch", "evaluation"},
    "experts": {"core", "io", "arch", "data", "experts"},
    # what `fwllm demo` runs; the benchmark harness built on it lives in eval/fwbench, outside the package
    "demo": {"core", "io", "arch", "data", "mergekit_glue", "evaluation", "experts", "demo"},
    "cli": set(),  # the top: anything
}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if "_data" in rel.parts:
            continue  # lm-eval hook files shipped as data, not part of the package's import graph
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        yield name, path


def imports(path):
    """(imported module, imported names) for every fwllm import in a file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fwllm"):
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("fwllm"):
                    yield a.name, []


def room(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_lives_in_a_room():
    entry = {"fwllm.__main__"}  # `python -m fwllm`: the cli's main, nothing else
    rooms = {f"fwllm.{r}" for r in ALLOWED} | entry
    loose = [m for m, _ in modules() if m.count(".") == 1 and m not in rooms]
    assert loose == [], f"modules outside the rooms: {loose}"


def test_imports_point_down_only():
    wrong = []
    for module, path in modules():
        mine = room(module)
        if mine not in ALLOWED or mine == "cli":
            continue
        for target, _ in imports(path):
            theirs = room(target)
            if theirs and theirs not in ALLOWED[mine]:
                wrong.append(f"{module} -> {target}")
    assert wrong == [], "imports that point up or sideways:\n" + "\n".join(wrong)


def test_no_import_circle():
    graph = {m: {t for t, _ in imports(p)} for m, p in modules()}
    known = set(graph)
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            while t not in known and "." in t:
                t = t.rsplit(".", 1)[0]  # `from fwllm.io import x`: the package module
            if t not in known:
                continue
            if state.get(t) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(t) :] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_private_name_is_imported_across_modules():
    private = [
        f"{module}: {target}.{n}"
        for module, path in modules()
        for target, names in imports(path)
        for n in names
        if n.startswith("_") and target != module
    ]
    assert private == [], private


def harness_names():
    """The top-level names eval/ offers to import: its packages (the harness, eval/fwbench) and scripts."""
    root = PACKAGE.parent / "eval"
    return (
        {"eval"}
        | {p.stem for p in root.glob("*.py")}
        | {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    )


def test_nothing_in_the_package_imports_the_benchmark_harness():
    """eval/ builds on fwllm, never the reverse: no module under fwllm/ imports eval/fwbench or an
    eval/ script, directly or through importlib (a wheel ships without eval/)."""
    offered = harness_names()
    assert "fwbench" in offered
    wrong = []
    for module, path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", ""))
                in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names = [str(node.args[0].value)]
            wrong += [f"{module} -> {n}" for n in names if n.split(".")[0] in offered]
    assert wrong == [], wrong


def test_the_rooms_exist_as_documented():
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert set(ALLOWED) <= rooms, set(ALLOWED) - rooms
    assert os.path.isdir(PACKAGE / "_data" / "eval_tasks")


def imported_modules(path):
    """Every fwllm module a file imports (`from fwllm.io import stats_store`: fwllm.io.stats_store)."""
    for target, names in imports(path):
        yield target
        yield from (f"{target}.{n}" for n in names)


def forbidden_imports(room_name, forbidden):
    return [
        f"{module} -> {target}"
        for module, path in modules()
        if room(module) == room_name
        for target in imported_modules(path)
        if target in forbidden
    ]


# a kernel is tensors and numbers in, tensors out: it knows no recipe, plan or job
CONFIG_MODULES = {"fwllm.core.params", "fwllm.core.plan", "fwllm.core.job"}
# a solver computes and returns; what is kept on disk (cache, scratch stores, the plan's merged
# tensors, the output) is the method's: it makes a store and hands it in where a solve needs one
STORE_MODULES = {
    "fwllm.io.stats_store",
    "fwllm.io.iterate_store",
    "fwllm.io.merged_store",
    "fwllm.io.staged_output",
    "fwllm.io.sketch_store",
}


def test_kernels_take_no_config_objects():
    assert all(m in {n for n, _ in modules()} for m in CONFIG_MODULES)  # the names are real
    wrong = forbidden_imports("kernels", CONFIG_MODULES)
    assert wrong == [], "kernels that import a config or plan module:\n" + "\n".join(wrong)


def test_solvers_import_no_store():
    assert all(m in {n for n, _ in modules()} for m in STORE_MODULES)  # the names are real
    wrong = forbidden_imports("solvers", STORE_MODULES)
    assert wrong == [], "solvers that import a store module:\n" + "\n".join(wrong)


def defined_names(path):
    """Every name a module defines: functions, classes, methods, assignments and dataclass fields."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            yield node.target.id
        elif isinstance(node, ast.Assign):
            yield from (t.id for t in node.targets if isinstance(t, ast.Name))


# what only the quality benchmark measures; it lives in eval/fwbench, and `fwllm demo` stays thin
BENCHMARK_ONLY = {
    "best_expert",  # the best single expert of a pool
    "best_single",
    "measure_members",  # every member's calibration loss, to pick it
    "differences",  # paired differences between methods
    "ties_scales",  # the TIES / DARE tuning grids
    "ties_densities",
    "dare_scales",
    "dare_densities",
}


def test_the_benchmark_harness_is_not_in_the_package():
    harness = PACKAGE.parent / "eval" / "fwbench"
    there = {n for p in harness.glob("*.py") for n in defined_names(p)}
    assert BENCHMARK_ONLY <= there, BENCHMARK_ONLY - there  # the names are real: the harness defines them
    wrong = sorted(
        f"{module}: {n}" for module, path in modules() for n in set(defined_names(path)) & BENCHMARK_ONLY
    )
    assert wrong == [], "benchmark-only code under fwllm/ (it belongs in eval/fwbench):\n" + "\n".join(wrong)
