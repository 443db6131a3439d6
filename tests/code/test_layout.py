"""The package's shape: no import circle inside `tidal`, no Prefect in it, MLflow in one module,
the floor (models, data) and the labeling wing importing nothing above them, no module over 600
lines.

Read from the source (every import statement, module level or inside a function), so a lazy
import that closes a circle counts too.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "tidal"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The tidal modules (and top-level outside packages) a file imports."""
    found = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            # a module of ours, or the outside package's top level
            while name not in modules and "." in name and name.startswith("tidal"):
                name = name.rsplit(".", 1)[0]
            found.add(name if name.startswith("tidal") else name.split(".")[0])
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: _imports(path, modules) - {name} for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle among tidal modules (a package importing its own submodules aside)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done or node not in graph:
            return None
        for dep in sorted(graph[node]):
            if dep.startswith(node + "."):
                continue  # `tidal.data` re-exporting `tidal.data.sources`
            found = visit(dep, path + [node])
            if found:
                return found
        done.add(node)
        return None

    for start in sorted(graph):
        found = visit(start, [])
        if found:
            return found
    return None


def test_no_import_circle_inside_tidal():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_the_circle_finder_finds_a_circle():
    assert _cycle({"tidal.a": {"tidal.b"}, "tidal.b": {"tidal.c"}, "tidal.c": {"tidal.a"}}) == [
        "tidal.a", "tidal.b", "tidal.c", "tidal.a"]


def test_tidal_never_imports_prefect_and_only_tracking_imports_mlflow():
    graph = _graph()
    assert not [m for m, deps in graph.items() if "prefect" in deps]
    assert sorted(m for m, deps in graph.items() if "mlflow" in deps) == ["tidal.tracking"]


def test_models_and_data_import_nothing_above_them():
    """Models and data sources are the floor: the trainer, the steps and the CLI build on them,
    never the other way (a model that reached up into tidal.train would drag the trainer into
    every process that loads a logged model)."""
    graph = _graph()
    floor = ("tidal.models", "tidal.data")
    allowed = floor + ("tidal.progress", "tidal.workspace")  # progress bars; atomic writes of the cache
    upward = {m: sorted(d for d in deps if d.startswith("tidal") and not d.startswith(allowed) and d != "tidal")
              for m, deps in graph.items() if m.startswith(floor)}
    assert {m: d for m, d in upward.items() if d} == {}


def test_labeling_imports_neither_the_cycle_steps_nor_the_trainer():
    """The labeling wing (query files, annotations, the provenance log, Label Studio, the import
    transaction) is used by the cycle's steps, never the other way: no module of tidal.labeling
    imports tidal.pipeline or tidal.train."""
    graph = _graph()
    wing = {m: deps for m, deps in graph.items() if m == "tidal.labeling" or m.startswith("tidal.labeling.")}
    assert wing, "no tidal.labeling package"
    upward = {m: sorted(deps & {"tidal.pipeline", "tidal.train"}) for m, deps in wing.items()}
    assert {m: d for m, d in upward.items() if d} == {}


MAX_LINES = 600  # a module over it holds more than one job: split it by job


def test_no_module_over_600_lines():
    lines = {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines()) for p in sorted(PACKAGE.rglob("*.py"))}
    offenders = {path: n for path, n in lines.items() if n > MAX_LINES}
    assert offenders == {}, f"split these modules by job (at most {MAX_LINES} lines each): {offenders}"


# Tasks whose work is Prefect's own (an artifact), so they call no step of tidal/ named after them.
PREFECT_ONLY_TASKS = {"publish_learning_curve"}
STEP_MODULES = {"pipeline", "tracking", "imports", "experiment"}  # flows/experiment.py's names for tidal's


def _tasks(path: Path) -> dict[str, tuple[str, set[str]]]:
    """Each @task function of a flows file: its Prefect name and the tidal step functions it calls
    (`pipeline.x`, `tracking.x`, `imports.x`, `tidal.experiment.x`)."""
    tasks = {}
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            if isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "task":
                name = next(k.value.value for k in deco.keywords if k.arg == "name")
                calls = {c.func.attr for c in ast.walk(node) if isinstance(c, ast.Call)
                         and isinstance(c.func, ast.Attribute) and isinstance(c.func.value, (ast.Name, ast.Attribute))
                         and (getattr(c.func.value, "id", None) or c.func.value.attr) in STEP_MODULES}
                tasks[node.name] = (name, calls)
    return tasks


def test_each_prefect_task_is_named_after_the_function_it_calls():
    """A task's Prefect name is its function's, and it runs the tidal step of that name (or `<name>_step`)."""
    tasks = _tasks(PACKAGE.parent / "flows" / "experiment.py")
    assert len(tasks) >= 15, sorted(tasks)
    for function, (name, calls) in tasks.items():
        assert name == function.replace("_", "-"), (function, name)
        if function not in PREFECT_ONLY_TASKS:
            assert calls & {function, f"{function}_step"}, (function, sorted(calls))


def test_the_task_name_check_finds_a_task_that_runs_another_step(tmp_path):
    flows = tmp_path / "flows.py"
    flows.write_text('@task(name="merge-labels")\ndef merge_labels(params):\n    return imports.import_labels(params)\n')
    (name, calls), = _tasks(flows).values()
    assert name == "merge-labels" and calls == {"import_labels"}
    assert not calls & {"merge_labels", "merge_labels_step"}
