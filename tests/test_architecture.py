"""The shape ARCHITECTURE.md describes, checked on the source: floors without upward imports, our own
modules imported at the top of files, one registry per concept that every consumer reads."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lowbit_helpers"

# ARCHITECTURE.md's floors, bottom up: a module imports from its own floor or below, never above
FLOORS = [
    {"errors", "artifacts", "schema", "formats", "weights", "graph"},
    {"runtime", "data", "decode", "evaluate", "assets", "export", "parity"},
    {"int8", "lowbit", "sensitivity"},
    {"config", "rundir"},
    {"steps", "gpu"},
    {"report"},
    {"pipeline", "__main__"},
]
# the only imports of our own modules inside functions: the command line keeps the notebook runner
# and the report layer (papermill, pandas) off the start-up of its other commands
LATE_OWN_IMPORTS = {("__main__", "pipeline"), ("__main__", "report.summary"), ("__main__", "gpu")}


def _module(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _floor(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, rooms in enumerate(FLOORS) if top in rooms)


def _own_imports(path: Path, root: Path = PACKAGE):
    """(imported module, line, inside a function?) for every relative import of ``path``."""
    module = _module(path, root)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    if module == "__main__":
        package = []
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    own = root.name
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            targets = [".".join(base + [node.module])] if node.module else [".".join(base + [a.name]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == own:  # absolute, same package
            targets = [node.module.partition(".")[2] or node.names[0].name]
        elif isinstance(node, ast.Import):
            targets = [a.name.partition(".")[2] for a in node.names if a.name.split(".")[0] == own and "." in a.name]
        for t in targets:
            yield t, node.lineno, id(node) not in top_level


def test_every_module_has_a_floor():
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py" or path.parent != PACKAGE:
            _floor(_module(path))  # StopIteration: a room ARCHITECTURE.md does not name


def violations(root: Path = PACKAGE) -> tuple[list[str], list[str]]:
    """(upward imports, late imports of our own modules) in the package at ``root``."""
    upward, late = [], []
    for path in sorted(root.rglob("*.py")):
        module = _module(path, root)
        if not module:
            continue
        for target, line, inside in _own_imports(path, root):
            if _floor(target) > _floor(module):
                upward.append(f"{module}:{line} imports {target}")
            if inside and (module, target) not in LATE_OWN_IMPORTS:
                late.append(f"{module}:{line} imports {target} inside a function")
    return upward, late


def test_no_upward_import_and_own_modules_at_the_top():
    assert violations() == ([], [])


def test_the_import_check_finds_what_it_names(tmp_path):
    """A package whose bottom floor imports a step, inside a function: both are found."""
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "__init__.py").write_text("")
    (tmp_path / "steps" / "baseline.py").write_text("from ..formats import FORMATS\n")
    (tmp_path / "formats.py").write_text("FORMATS = {}\n\n\ndef f():\n    from .steps import baseline\n")
    (tmp_path / "schema.py").write_text(f"from {tmp_path.name}.report import x\n")  # absolute, upward
    upward, late = violations(tmp_path)
    assert upward == ["formats:5 imports steps", "schema:1 imports report"]
    assert late == ["formats:5 imports steps inside a function"]


@pytest.mark.parametrize("concept, registry, consumers", [
    ("INT8 backends", "int8.BACKENDS", ["config.Int8Variant", "__main__ quantize-int8 --backend"]),
    ("4-bit methods", "lowbit.METHODS", ["config.CandidatesCfg.method", "__main__ materialize --method"]),
    ("formats", "formats.FORMATS", ["config.Fmt", "__main__ sensitivity --format"]),
    ("metrics", "sensitivity.metrics.METRICS", ["config.Metric", "__main__ sensitivity --metric"]),
    ("engines", "runtime.ENGINES", ["config.Engine"]),
])  # fmt: skip
def test_one_list_per_concept(concept, registry, consumers):
    """The params schema and the command line take their choices from the registry, not a copy."""
    from typing import get_args

    from lowbit_helpers import config, formats, int8, lowbit, runtime
    from lowbit_helpers.__main__ import build_parser
    from lowbit_helpers.sensitivity import metrics

    names = {"int8.BACKENDS": list(int8.BACKENDS), "lowbit.METHODS": list(lowbit.METHODS),
             "formats.FORMATS": list(formats.FORMATS), "sensitivity.metrics.METRICS": list(metrics.METRICS),
             "runtime.ENGINES": list(runtime.ENGINES)}[registry]  # fmt: skip
    schema = {"int8.BACKENDS": config.Int8Variant.model_fields["backend"].annotation, "formats.FORMATS": config.Fmt,
              "sensitivity.metrics.METRICS": config.Metric, "runtime.ENGINES": config.Engine}.get(registry)  # fmt: skip
    if schema is not None:
        assert list(get_args(schema)) == names, concept
    sub = build_parser()._subparsers._group_actions[0].choices
    flags = {"int8.BACKENDS": ("quantize-int8", "--backend"), "formats.FORMATS": ("sensitivity", "--format"),
             "sensitivity.metrics.METRICS": ("sensitivity", "--metric"), "lowbit.METHODS": ("materialize", "--method")}  # fmt: skip
    if registry in flags:
        command, flag = flags[registry]
        action = next(a for a in sub[command]._actions if flag in a.option_strings)
        shown = " ".join(map(str, [action.choices or "", action.metavar or "", action.help or ""]))
        assert all(n in shown for n in names), (concept, shown)


def test_no_hand_written_copy_of_a_registry():
    """The params schema and the command line spell no registered name in a Literal or a choices list:
    they read the registries (a copy would go stale when a backend, method or format is added)."""
    from lowbit_helpers import formats, int8, lowbit, runtime
    from lowbit_helpers.int8.policy import HEAD_POLICIES
    from lowbit_helpers.schema import DECODE_MODES
    from lowbit_helpers.sensitivity.metrics import METRICS
    from lowbit_helpers.sensitivity.sweep import DIRECTIONS

    registered = {*int8.BACKENDS, *int8.ALL_METHODS, *int8.ALL_BIAS_CORRECTIONS, *HEAD_POLICIES, *lowbit.METHODS,
                  *formats.FORMATS, *METRICS, *runtime.ENGINES, *runtime.RUNTIMES, *DIRECTIONS,
                  *DECODE_MODES, *(c for spec in int8.option_specs().values() for c in spec.choices or ())}
    registered -= {"none", "all"}  # words of other lists too (a placement "all", "confirm: all")  # fmt: skip
    copies = []
    for name in ("config.py", "__main__.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        for node in ast.walk(tree):
            spelled = []
            if isinstance(node, ast.Subscript) and getattr(node.value, "id", "") == "Literal":
                spelled = [c.value for c in ast.walk(node.slice) if isinstance(c, ast.Constant)]
            elif isinstance(node, ast.keyword) and node.arg == "choices" and isinstance(node.value, (ast.List, ast.Tuple)):
                spelled = [c.value for c in node.value.elts if isinstance(c, ast.Constant)]
            copies += [f"{name}:{node.lineno if hasattr(node, 'lineno') else node.value.lineno} {v!r}" for v in spelled if v in registered]
    assert copies == []
