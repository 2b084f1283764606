"""The package's floors: a module imports only from its own floor or below, no import cycle (imports inside
functions counted), and edgeattn modules are never imported lazily (only optional third-party packages are).

Read from the source with ``ast``, so the check sees every import whether or not it runs."""

import ast
import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edgeattn"

# bottom-up; a module (or package) name relative to edgeattn -> its floor.  "" is the package root, the front door.
FLOORS = [
    ("base", ["errors", "files", "signature", "version", "lmloop"]),
    ("core", ["masks", "tables", "attention", "layers", "routing", "decisions"]),
    ("converters", ["convert"]),
    ("file format", ["onnxfile"]),
    ("runtimes", ["runtimes"]),
    ("export", ["export"]),
    ("models", ["models"]),
    (
        "tools",
        [
            "parity",
            "registered",
            "bench",
            "conformance",
            "inspection",
            "plots",
            "serve",
            "generation",
            "cli",
            "__main__",
        ],
    ),
    ("front door", [""]),
]


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name (without ``edgeattn.``; "" for the root) -> file."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def floor_of(name: str) -> int:
    top = name.split(".")[0]
    for level, (_, names) in enumerate(FLOORS):
        if top in names:
            return level
    raise AssertionError(f"edgeattn.{name} is on no floor: add it to FLOORS in {Path(__file__).name}")


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for each edgeattn import of module ``name``."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[: len(package) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                elif child.module and child.module.split(".")[0] == "edgeattn":
                    target = child.module.partition(".")[2]
                else:
                    target = None
                if target is not None:
                    for alias in child.names:  # `from . import x` may name a submodule
                        sub = f"{target}.{alias.name}" if target else alias.name
                        targets.append(sub if sub in known else target)
            elif isinstance(child, ast.Import):
                targets = [a.name.partition(".")[2] for a in child.names if a.name.split(".")[0] == "edgeattn"]
            for target in targets:
                while target not in known and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != name:
                    found.append((target if target in known else "", child.lineno, inside))
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return found


def violations(root: Path = PACKAGE) -> list[str]:
    known = modules(root)
    graph: dict[str, set[str]] = {name: set() for name in known}
    problems = []
    for name, path in known.items():
        here = floor_of(name)
        for target, line, lazy in imports(name, path, known):
            graph[name].add(target)
            where = f"edgeattn.{name or '__init__'} line {line}"
            if floor_of(target) > here:
                problems.append(
                    f"{where} imports edgeattn.{target or '__init__'}, on a higher floor "
                    f"({FLOORS[floor_of(target)][0]} above {FLOORS[here][0]})"
                )
            if lazy:
                problems.append(f"{where} imports edgeattn.{target or '__init__'} inside a function")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(f"edgeattn.{m or '__init__'}" for m in component))

    for v in graph:
        if v not in index:
            connect(v)
    return found


def test_the_package_keeps_its_floors():
    assert violations() == []


def test_every_floor_is_used():
    used = {floor_of(name) for name in modules(PACKAGE)}
    assert used == set(range(len(FLOORS)))


def plant(tmp_path: Path, module: str, line: str) -> Path:
    copy = tmp_path / "edgeattn"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + "\n" + line + "\n")
    return copy


def test_a_planted_upward_import_fails(tmp_path):
    copy = plant(tmp_path, "tables.py", "from .runtimes import load")
    assert any("edgeattn.tables line" in p and "higher floor" in p for p in violations(copy))


def test_a_planted_lazy_import_and_cycle_fail(tmp_path):
    copy = plant(tmp_path, "masks/window.py", "def f():\n    from . import neighborhood")
    copy = plant(tmp_path / "again", "masks/neighborhood.py", "from .window import window")
    shutil.copy(tmp_path / "edgeattn/masks/window.py", copy / "masks/window.py")
    found = violations(copy)
    assert any("edgeattn.masks.window" in p and "inside a function" in p for p in found), found
    assert any(p.startswith("import cycle") and "edgeattn.masks.neighborhood" in p for p in found), found
