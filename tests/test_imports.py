"""The package's import graph: no circle, no import from a higher layer, no hidden persllm imports.

The layers are ``persllm.docgen.LAYERS`` (the module map in docs/architecture.md is made from them). A
persllm import inside a function is allowed only with a ``# defers <library>`` comment naming the heavy
library that importing the module at the top would load.
"""

import ast
from pathlib import Path

import persllm
from persllm.docgen import ENTRY_POINTS, LAYERS

PACKAGE = Path(persllm.__file__).parent
HEAVY = ("torch", "transformers", "trl", "peft", "sentence_transformers", "faiss", "fastapi", "gguf")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def in_function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return True
    return False


def imports() -> list[tuple[str, str, bool, str]]:
    """(importer, imported module, inside a function, source line) for every persllm import."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        tree = ast.parse(source)
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            if type_checking_only(node, parents):
                continue
            for target in targets:
                if not target.startswith("persllm"):
                    continue
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                found.append((name, target, in_function(node, parents), lines[node.lineno - 1]))
    return found


def layer_of(module: str) -> int:
    best = (-1, -1)
    for index, (_, names) in enumerate(LAYERS):
        for short in names:
            prefix = f"persllm.{short}"
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[1]:
                best = (index, len(prefix))
    if module == "persllm":
        return 0
    assert best[0] >= 0, f"{module} is in no layer of persllm.docgen.LAYERS; add it there"
    return best[0]


def test_every_module_has_a_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))


def test_no_module_imports_from_a_higher_layer_except_the_entry_points() -> None:
    upward = sorted(
        {(a, b) for a, b, _, _ in imports() if layer_of(b) > layer_of(a) and a not in ENTRY_POINTS}
    )
    assert upward == [], "imports from a higher layer:\n" + "\n".join(f"{a} -> {b}" for a, b in upward)
    assert len(ENTRY_POINTS) <= 1


def test_the_import_graph_has_no_circle() -> None:
    graph: dict[str, set[str]] = {}
    for importer, imported, _, _ in imports():
        if importer != imported:
            graph.setdefault(importer, set()).add(imported)
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert circles == [], "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_persllm_imports_inside_functions_name_the_heavy_library_they_defer() -> None:
    hidden = [
        f"{a}: {line.strip()}"
        for a, _, inside, line in imports()
        if inside and not any(f"defers {lib}" in line for lib in HEAVY)
    ]
    assert hidden == [], "persllm imports inside functions without a reason:\n" + "\n".join(hidden)
