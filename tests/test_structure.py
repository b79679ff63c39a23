"""The shape docs/architecture.md promises, read from the source (not imported): a thin cache, small
classes, no module-level state rebound at run time, no import circle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kvpolicy"
#: pluggy's lazily made plugin manager: the one module-level value set at run time (``issues`` #24)
REBOUND_ALLOWED = {("kvpolicy.core.registry", "_manager")}


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def code_lines(node: ast.AST, source_lines: set[int]) -> int:
    """Lines of ``node`` holding code: not blank, not comments, not docstrings."""
    docstrings = set()
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if (isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    return len((set(range(node.lineno, node.end_lineno + 1)) & source_lines) - docstrings)


def classes() -> dict[str, int]:
    sizes = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        code = {i for i, line in enumerate(text.splitlines(), 1) if line.strip() and not line.strip().startswith("#")}
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                sizes[f"{path.relative_to(ROOT)}::{node.name}"] = code_lines(node, code)
    return sizes


def test_the_cache_is_thin_and_no_class_is_large():
    sizes = classes()
    assert sizes["kvpolicy/core/cache.py::PolicyCache"] <= 250
    large = {name: n for name, n in sizes.items() if n > 300}
    assert not large, f"classes over 300 code lines: {large}"


def test_no_module_level_state_is_rebound_at_run_time():
    rebound = set()
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                rebound.update((name, var) for var in node.names)
    assert rebound <= REBOUND_ALLOWED, f"module-level names rebound by functions: {sorted(rebound - REBOUND_ALLOWED)}"


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The kvpolicy modules ``name`` imports (at the top or inside functions)."""
    package = name if (PACKAGE / Path(*name.split(".")[1:]) / "__init__.py").exists() else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            subs = [f"{target}.{alias.name}" for alias in node.names]
            found = [s for s in subs if s in known]
            out.update(found)
            if len(found) < len(subs) and target in known:
                out.add(target)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in known)
    out.discard(name)
    return out


def test_no_import_circle():
    trees = modules()
    graph = {name: imports(name, tree, set(trees)) for name, tree in trees.items()}
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
