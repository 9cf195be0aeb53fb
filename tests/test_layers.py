"""kiln's modules stack in floors: a module imports only from its own floor or below, and no chain of
module-level imports comes back to where it started. A newcomer can then read any module knowing
that nothing above it is involved."""

import ast
from pathlib import Path

KILN = Path(__file__).resolve().parents[1] / "kiln"

# Lowest first. A module not listed takes its package's floor (kiln.tasks.qa: kiln.tasks).
FLOORS = [
    ["kiln.errors", "kiln.version", "kiln.files", "kiln.log"],
    ["kiln.model_files", "kiln.config", "kiln.metrics", "kiln.outputs", "kiln.html"],
    ["kiln.tokenizers", "kiln.data", "kiln.models", "kiln.profiles", "kiln.pretrained", "kiln.tasks",
     "kiln.estimate", "kiln.deepspeed", "kiln.weight_selection"],
    ["kiln.training"],
    ["kiln.predictor", "kiln.card", "kiln.export", "kiln.onnx_generate", "kiln.distill"],
    ["kiln.run", "kiln.describe", "kiln.report", "kiln.suite", "kiln.serve", "kiln.tuning"],
    ["kiln.cli", "kiln", "kiln.__main__"],
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(KILN.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor_of(module: str) -> int:
    probe = module
    while probe not in FLOOR:
        assert "." in probe, f"{module} is on no floor: add it to FLOORS"
        probe = probe.rsplit(".", 1)[0]
    return FLOOR[probe]


def imports(path: Path) -> list[tuple[str, bool]]:
    """``(kiln module imported, at module level?)`` for each import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kiln") and not node.level:
            for alias in node.names:  # `from kiln.training import checkpoint` imports a module
                sub = f"{node.module}.{alias.name}"
                found.append((sub if (KILN.parent / (sub.replace(".", "/") + ".py")).exists() else node.module,
                              id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names if alias.name.startswith("kiln")]
    return found


def graph() -> dict[str, list[tuple[str, bool]]]:
    return {module_name(path): imports(path) for path in sorted(KILN.rglob("*.py"))}


def test_no_module_imports_from_a_floor_above_its_own():
    upward = [f"{module} (floor {floor_of(module)}) imports {target} (floor {floor_of(target)})"
              for module, targets in graph().items() for target, _ in targets
              if floor_of(target) > floor_of(module)]
    assert upward == []


def test_no_circle_of_module_level_imports():
    edges = {module: {target for target, top in targets if top} for module, targets in graph().items()}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(edges.get(module, ())):
            if target in path:
                circles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in done:
                visit(target, [*path, target])
        done.add(module)

    done: set[str] = set()
    for module in sorted(edges):
        if module not in done:
            visit(module, [module])
    assert circles == []


def test_no_function_is_over_60_lines():
    """A function that does not fit on a screen does several things: each gets a name instead."""
    long = []
    for path in sorted(KILN.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{module_name(path)}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []


def test_every_task_implements_the_small_protocol_itself():
    """The ten methods of TaskProtocol have no default: each registered task implements them (and
    writes its predictions: output_columns or write), and a task class that forgets one fails at once,
    not after training."""
    import pytest

    from kiln.config import Config
    from kiln.tasks import TASKS, get_task, task_class
    from kiln.tasks.base import REQUIRED, Task

    assert len(REQUIRED) == 10
    for name in TASKS:
        task = task_class(name)
        assert all(getattr(task, method) is not getattr(Task, method, None) for method in REQUIRED), name
        assert task.output_columns is not Task.output_columns or task.write is not Task.write, name
        get_task(name, Config())

    forgetful = type("Forgetful", (Task,), {m: lambda self, *a, **k: None for m in REQUIRED if m != "decode"})
    with pytest.raises(TypeError, match="decode"):
        forgetful(Config())
