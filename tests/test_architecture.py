"""ARCHITECTURE.md stays true: the folder-to-folder imports it lists are the ones the
code makes, they point down the data path, no module imports itself back through
others, and no module grows past 500 lines."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mlx_flashinfer", "fallback_numpy")
MAX_LINES = 500


def modules() -> dict[str, Path]:
    """Every module of the two packages by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imported(name: str, path: Path, known: dict) -> set[str]:
    """The modules of the two packages that module `name` imports, wherever the
    import stands (a function's own imports count: they are arrows too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:  # `from . import x`: x may be a module
                sub = f"{source}.{alias.name}"
                targets.add(sub if sub in known else source)
    return {t for t in targets if t in known and t != name}


def room(name: str) -> str:
    """The folder a module lives in: api for the top-level modules of
    mlx_flashinfer, cli for its `python -m` entry point."""
    parts = name.split(".")
    if parts[0] == "fallback_numpy":
        return "fallback_numpy"
    if len(parts) == 1 or parts[1] in ("__init__",):
        return "api"
    if parts[1] == "__main__":
        return "cli"
    if (ROOT / "mlx_flashinfer" / parts[1]).is_dir():
        return parts[1]
    return "api"


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def room_arrows(graph) -> set[tuple[str, str]]:
    return {
        (room(a), room(b))
        for a, targets in graph.items()
        for b in targets
        if room(a) != room(b)
    }


def documented_arrows() -> set[tuple[str, str]]:
    """The arrows of ARCHITECTURE.md's block under "## Who imports whom": lines
    `room -> other, other`."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("\n## Who imports whom\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```text\n(.*?)```", section, re.DOTALL).group(1)
    arrows = set()
    for line in block.splitlines():
        if "->" in line:
            source, targets = (s.strip() for s in line.split("->", 1))
            arrows.update((source, t.strip()) for t in targets.split(","))
    return arrows


def test_architecture_lists_exactly_the_imports_between_folders():
    code = room_arrows(import_graph())
    listed = documented_arrows()
    assert code - listed == set(), "imports ARCHITECTURE.md does not list"
    assert listed - code == set(), "ARCHITECTURE.md lists imports the code lacks"


def test_folders_import_only_down_the_data_path():
    """The order of the rooms, top to bottom: every arrow points down it."""
    order = [
        "cli",
        "serve",
        "bench",
        "api",
        "plan",
        "predictors",
        "flash",
        "model",
        "fallback_numpy",
        "formats",
    ]
    for source, target in room_arrows(import_graph()):
        assert order.index(source) < order.index(target), f"{source} -> {target}"


def test_no_module_imports_itself_back():
    graph = import_graph()
    done, path = set(), []

    def visit(name):
        if name in path:
            cycle = path[path.index(name) :] + [name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        path.append(name)
        for target in sorted(graph[name]):
            visit(target)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_the_graph_sees_imports_of_every_form():
    """The checks above are only as good as `imported`: relative, absolute, from a
    package, and inside functions."""
    graph = import_graph()
    assert "mlx_flashinfer.formats.layout" in graph["mlx_flashinfer.loader"]
    assert "mlx_flashinfer.formats.quantize" in graph["fallback_numpy.backend"]
    # a function's own import (loader makes the default model's predictor lazily)
    assert "mlx_flashinfer.predictors.train" in graph["mlx_flashinfer.loader"]
    # `from . import x` of a module
    assert "mlx_flashinfer.cli.bench" in graph["mlx_flashinfer.cli"]


def test_no_module_over_500_lines():
    long = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}
