"""The package's import layers (docs/architecture.md): no import cycle between modules, and no
import from a lower layer into a higher one. Function-level imports count: a lazy import
still ties the modules together."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "melanoma"
# Bottom to top; a top-level module not named here (errors, files, plots, config, provenance, quiet) is layer 0.
LAYERS = {"data": 1, "modeling": 2, "serving": 3, "cli": 4, "__main__": 4}


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    root = package.parent
    return {".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
            for path in sorted(package.rglob("*.py"))}


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def import_graph(package: Path) -> dict[str, set[str]]:
    """Each module -> the package modules it imports (``from a import b`` may import module a.b)."""
    modules = module_files(package)
    top = package.name
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        graph[name] = {target for target in targets if target in modules and target not in (name, top)}
    return graph


def layer_problems(package: Path) -> list[str]:
    graph = import_graph(package)
    problems = [f"upward import: {module} -> {target}" for module, targets in sorted(graph.items())
                for target in sorted(targets) if layer(target) > layer(module)]
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        problems.append("import cycle: " + " -> ".join(error.args[1]))
    return problems


def test_the_package_has_no_import_cycle_and_no_upward_import() -> None:
    assert len(module_files(PACKAGE)) > 40  # the walk found the package
    assert layer_problems(PACKAGE) == []


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "melanoma"


def test_the_check_finds_a_cycle_through_a_lazy_import(tmp_path: Path) -> None:
    package = write_package(tmp_path, {
        "melanoma/__init__.py": "",
        "melanoma/modeling/__init__.py": "",
        "melanoma/modeling/a.py": "from melanoma.modeling.b import f\n",
        "melanoma/modeling/b.py": "def f():\n    from melanoma.modeling import a\n",
    })
    assert layer_problems(package) in (["import cycle: melanoma.modeling.a -> melanoma.modeling.b -> melanoma.modeling.a"],
                                       ["import cycle: melanoma.modeling.b -> melanoma.modeling.a -> melanoma.modeling.b"])


def test_the_check_finds_an_upward_import(tmp_path: Path) -> None:
    package = write_package(tmp_path, {
        "melanoma/__init__.py": "",
        "melanoma/config.py": "",
        "melanoma/data/__init__.py": "",
        "melanoma/data/archive.py": "import melanoma.config\n",
        "melanoma/serving/__init__.py": "",
        "melanoma/serving/app.py": "from melanoma.data.archive import x\n",
        "melanoma/modeling/__init__.py": "",
        "melanoma/modeling/train.py": "from melanoma.serving import app\n",
    })
    assert layer_problems(package) == ["upward import: melanoma.modeling.train -> melanoma.serving",
                                       "upward import: melanoma.modeling.train -> melanoma.serving.app"]
