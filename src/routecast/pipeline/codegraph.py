"""Which routecast modules a piece of code runs: the import graph, read from the source (AST).

Used where "the code behind a result" must be complete: the tune study's fingerprint (a change to
any module a trial runs starts a fresh study) and the test that every stage's `deps` in dvc.yaml
list every module the stage imports (tests/test_dvc_deps.py).
"""

from __future__ import annotations

import ast
import hashlib
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
