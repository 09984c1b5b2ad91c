"""Which routecast modules a piece of code runs: the import graph, read from the source (AST).

Used where "the code behind a result" must be complete: the tune study's fingerprint (a change to
any module a trial runs starts a fresh study) and the test that every stage's `deps` in dvc.yaml
list every module the stage imports (tests/test_dvc_deps.py). `eager_closure` narrows it to what
importing a file runs (imports outside functions), for the test that no stage loads torch, numba or
pyarrow it does not use (tests/test_stage_imports.py).
"""

from __future__ import annotations

import ast
import hashlib
import sys
from pathlib import Path

PACKAGE = "routecast"
SOURCE = Path(__file__).resolve().parents[1]  # src/routecast


def module_path(module: str, source: Path = SOURCE) -> Path:
    """`routecast.x` -> src/routecast/x.py (or x/__init__.py)."""
    parts = module.split(".")[1:]
    if not parts:
        return source / "__init__.py"
    path = source.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports_of(path: Path, source: Path = SOURCE) -> set[str]:
    """The routecast modules a file imports, anywhere in it (also inside functions: they run too),
    except in a module-level `__getattr__`: a lazy attribute (`routecast.Predictor`) imports its
    module only when someone asks for it, and then the asker's own imports name it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lazy = {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
            for n in ast.walk(f)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in lazy:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
            found.add(node.module)
            # `from routecast import predictor` imports a module, not a name
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if module_path(f"{node.module}.{a.name}", source).exists()}
    return found


def packages_of(module: str, source: Path = SOURCE) -> list[Path]:
    """The `__init__.py` of every package above `module`, which Python runs before it."""
    parts = module.split(".")[1:]
    return [source.joinpath(*parts[:i], "__init__.py") for i in range(len(parts))]


def closure(paths: list[Path], source: Path = SOURCE) -> set[Path]:
    """Every src/routecast file that `paths` import, transitively (with the `__init__.py` of every
    package above each, as Python runs them first)."""
    todo = list(paths)
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        for module in imports_of(path, source):
            for target in (module_path(module, source), *packages_of(module, source)):
                if target.exists() and target not in seen:
                    seen.add(target)
                    todo.append(target)
    return seen


def code_digest(modules: list[str], source: Path = SOURCE) -> str:
    """sha256 over the files of `modules` and everything they import (sorted, so order is fixed)."""
    roots = [module_path(m, source) for m in modules]
    files = set(roots) | closure(roots, source)
    h = hashlib.sha256()
    # Relative paths, not file names: several packages hold an `__init__.py`.
    for rel, path in sorted((path.relative_to(source).as_posix(), path) for path in files):
        h.update(rel.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- what importing a file runs
#
# `imports_of` and `closure` see every import, also those inside functions (they run when the function
# does: right for "the code behind a result"). What a script pays to start is narrower: the imports that
# run when the file is imported, before any function is called. A stage that imports torch only inside
# the function that needs it pays for torch only on that path (tests/test_stage_imports.py).


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_main_guard(test: ast.expr) -> bool:
    """`__name__ == "__main__"` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and \
        any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides)


def eager_import_nodes(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported: at module level, also inside
    module-level `if`/`try`/`with`/loop blocks and class bodies (they run at import too), but not
    inside a function (it runs only when called), nor under `if TYPE_CHECKING:` (never at run time)
    or `if __name__ == "__main__":` (only when the file runs as a script, and then its imports are
    that path's)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                if not (_is_type_checking(node.test) or _is_main_guard(node.test)):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try, ast.TryStar)):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, (ast.With, ast.AsyncWith, ast.ClassDef)):
                visit(node.body)
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Match):
                for case in node.cases:
                    visit(case.body)
            # FunctionDef, AsyncFunctionDef: their bodies run only when called

    visit(tree.body)
    return found


def _is_routecast(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _imported_names(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement names (`from a.b import c`: a.b); none for a relative import
    (routecast uses none, as `imports_of` assumes)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return [node.module] if node.level == 0 and node.module else []


def eager_imports_of(path: Path, source: Path = SOURCE) -> tuple[set[str], set[str]]:
    """What importing the file `path` imports itself: (the routecast modules, the statements that
    import anything else outside the standard library, as source text: "from torch import nn")."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules: set[str] = set()
    statements: set[str] = set()
    for node in eager_import_nodes(tree):
        for name in _imported_names(node):
            if _is_routecast(name):
                modules.add(name)
                if isinstance(node, ast.ImportFrom):  # `from routecast.x import y` imports the module y too
                    modules |= {f"{name}.{a.name}" for a in node.names
                                if module_path(f"{name}.{a.name}", source).exists()}
            elif name.split(".")[0] not in sys.stdlib_module_names:
                statements.add(ast.unparse(node))
    return modules, statements


def eager_closure(paths: list[Path], source: Path = SOURCE) -> tuple[set[Path], set[str]]:
    """What importing `paths` runs: every src/routecast file reached through imports that run at
    import (`eager_import_nodes`), transitively, with the `__init__.py` of every package above each;
    and the statements (source text) by which all these import packages outside routecast and the
    standard library. What those packages import in turn (pandas loads pyarrow) is not read here."""
    todo = list(paths)
    seen: set[Path] = set()
    statements: set[str] = set()
    while todo:
        path = todo.pop()
        modules, third_party = eager_imports_of(path, source)
        statements |= third_party
        for module in modules:
            for target in (module_path(module, source), *packages_of(module, source)):
                if target.exists() and target not in seen:
                    seen.add(target)
                    todo.append(target)
    return seen, statements


def top_level_packages(statements: set[str]) -> set[str]:
    """The top-level package of each import statement: "from torch import nn" -> torch."""
    nodes = [node for text in statements for node in ast.parse(text).body
             if isinstance(node, (ast.Import, ast.ImportFrom))]
    return {name.split(".")[0] for node in nodes for name in _imported_names(node)}


def eager_packages(paths: list[Path], source: Path = SOURCE) -> set[str]:
    """The top-level packages, other than routecast and the standard library's, that importing
    `paths` imports through routecast's own module-level imports (`eager_closure`)."""
    return top_level_packages(eager_closure(paths, source)[1])


def eager_import_chain(path: Path, package: str, source: Path = SOURCE) -> list[str] | None:
    """One shortest chain of imports that run at import, from `path` to a statement importing the
    top-level package `package`: ["stages/x.py", "src/routecast/a.py", "src/routecast/b.py:12: import
    torch"] (paths relative to the repository root, two levels above `source`, where they are under
    it); None when neither `path` nor a routecast module it reaches so imports `package`."""
    def label(p: Path) -> str:
        try:
            return p.relative_to(source.parents[1]).as_posix()
        except ValueError:
            return str(p)

    queue: list[tuple[Path, list[str]]] = [(path, [label(path)])]
    seen = {path}
    while queue:
        current, chain = queue.pop(0)
        tree = ast.parse(current.read_text(), filename=str(current))
        for node in eager_import_nodes(tree):
            if any(name.split(".")[0] == package for name in _imported_names(node)):
                return [*chain[:-1], f"{chain[-1]}:{node.lineno}: {ast.unparse(node)}"]
        modules, _ = eager_imports_of(current, source)
        for module in sorted(modules):
            for target in (*packages_of(module, source), module_path(module, source)):
                if target.exists() and target not in seen:
                    seen.add(target)
                    queue.append((target, [*chain, label(target)]))
    return None
