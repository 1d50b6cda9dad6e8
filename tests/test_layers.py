"""The package's layers import only downward (README, Layout), and no modules import each other.

Every import counts: at the top of a module, inside a function, or under
`if TYPE_CHECKING:` (a type-only import still ties two modules together). The
code is read with `ast`, never imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Bottom first. A module may import modules of its own entry and of every entry
# of a lower rank; generation and storage share a rank and never import each other.
LAYERS = {
    "t2i_task.config": 0,
    "t2i_task.generation": 1,
    "t2i_task.storage": 1,
    "t2i_task.task": 2,
    "t2i_task.jobs": 3,
    "t2i_task.api": 4,
    "t2i_task.local_server": 5,
    "service": 5,
}
PACKAGE_ROOT = "t2i_task"  # its __init__ only describes the layers; importing it ties nothing


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path) -> dict[str, Path]:
    """The server's modules by dotted name: the t2i_task package and service.py."""
    files = sorted((root / PACKAGE_ROOT).rglob("*.py"))
    if (root / "service.py").exists():
        files.append(root / "service.py")
    return {module_name(path, root): path for path in files}


def layer_of(module: str) -> str | None:
    """The LAYERS entry a module belongs to: the longest one that is it or a package above it."""
    owners = [entry for entry in LAYERS if module == entry or module.startswith(entry + ".")]
    return max(owners, key=len, default=None)


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules this one imports, wherever in the file the import statement is."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in modules:  # `import a.b.name_in_b` -> module a.b
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # `from a import b` imports module a.b when there is one, else a name of module a.
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {name for name in found if name != PACKAGE_ROOT}


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import that does not point to the module's own layer entry or one of a lower rank."""
    wrong = []
    for module, imported in sorted(graph.items()):
        own = layer_of(module)
        for target in sorted(imported):
            theirs = layer_of(target)
            if own is None or theirs is None or own == theirs:
                continue  # modules in no layer are reported by test_every_module_has_a_layer
            if LAYERS[theirs] >= LAYERS[own]:
                wrong.append(f"{module} imports {target}: {theirs} (rank {LAYERS[theirs]}) is not below "
                             f"{own} (rank {LAYERS[own]})")
    return wrong


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or around a loop (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = lowest[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph.get(module, ()):
            if target not in index:
                visit(target)
                lowest[module] = min(lowest[module], lowest[target])
            elif target in on_stack:
                lowest[module] = min(lowest[module], index[target])
        if lowest[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_every_module_has_a_layer():
    unplaced = [module for module in project_modules(PROJECT_ROOT) if module != PACKAGE_ROOT and layer_of(module) is None]
    assert not unplaced, f"put these modules in a layer's folder (and LAYERS here, README's Layout): {unplaced}"


def test_imports_point_down_the_layers():
    wrong = upward_imports(import_graph(PROJECT_ROOT))
    assert not wrong, "\n".join(wrong)


def test_no_modules_import_each_other():
    assert not circles(import_graph(PROJECT_ROOT))


def test_the_dashai_plugin_imports_nothing_of_the_server():
    """The plugin runs inside DashAI's worker and speaks to the server over HTTP only."""
    plugin = PROJECT_ROOT / "integrations" / "dashai" / "dashai_t2i_server"
    imported = {
        f"{path.name}: {name}"
        for path in plugin.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        for name in ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if name.split(".")[0] in (PACKAGE_ROOT, "service")
    }
    assert not imported


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_type_only_upward_import_is_caught(tmp_path):
    """The check itself: storage may not import jobs, not even for type checking."""
    root = write_tree(tmp_path, {
        "t2i_task/__init__.py": "",
        "t2i_task/storage/__init__.py": "",
        "t2i_task/storage/store.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                     "    from t2i_task.jobs import failures\n",
        "t2i_task/jobs/__init__.py": "",
        "t2i_task/jobs/failures.py": "from t2i_task.storage.store import x\n",
        "t2i_task/generation/__init__.py": "",
        "t2i_task/generation/runner.py": "from ..storage import store\n",
    })
    graph = import_graph(root)
    assert graph["t2i_task.storage.store"] == {"t2i_task.jobs.failures"}
    assert graph["t2i_task.generation.runner"] == {"t2i_task.storage.store"}  # relative, and between siblings
    assert [line.split(":")[0] for line in upward_imports(graph)] == [
        "t2i_task.generation.runner imports t2i_task.storage.store",
        "t2i_task.storage.store imports t2i_task.jobs.failures",
    ]


def test_a_circle_inside_one_layer_is_caught(tmp_path):
    root = write_tree(tmp_path, {
        "t2i_task/__init__.py": "",
        "t2i_task/jobs/__init__.py": "",
        "t2i_task/jobs/live.py": "def f():\n    import t2i_task.jobs.processes\n",
        "t2i_task/jobs/processes.py": "from t2i_task.jobs import queue\n",
        "t2i_task/jobs/queue.py": "from t2i_task.jobs.live import LiveCalls\n",
        "t2i_task/jobs/scheduler.py": "from t2i_task.jobs.queue import x\n",
    })
    graph = import_graph(root)
    assert not upward_imports(graph)
    assert circles(graph) == [["t2i_task.jobs.live", "t2i_task.jobs.processes", "t2i_task.jobs.queue"]]
