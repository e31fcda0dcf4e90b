"""The method registry: every `Method` subclass found in the `methods/` folders and in installed packages.

Sources, in order: the repository's own `methods/` folder, `./methods` of the working directory,
folders listed in KDBENCH_METHODS (os.pathsep-separated), and the entry-point group
`kdbench.methods` of pip-installed packages (each entry a module or a Method subclass).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import os
import sys
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from kdbench import KdbenchError
from kdbench import losses, method
from kdbench.method import Method

REPO_METHODS = Path(__file__).resolve().parents[1] / "methods"


def method_dirs() -> list[Path]:
    dirs = [REPO_METHODS, Path.cwd() / "methods"]
    dirs += [Path(p) for p in os.environ.get("KDBENCH_METHODS", "").split(os.pathsep) if p]
    seen, unique = set(), []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            unique.append(d)
    return unique


def _classes_in(module: ModuleType) -> list[type[Method]]:
    return [c for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, Method) and c is not Method and c.__module__ == module.__name__ and c.name]


def _load_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"kdbench_methods.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: dataclasses, pickling and inspect look a module up there
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a broken plugin must not hide which file it is
        sys.modules.pop(spec.name, None)
        raise KdbenchError(f"{path}: method plugin failed to import: {type(exc).__name__}: {exc}") from exc
    return module


@lru_cache(maxsize=1)
def methods() -> dict[str, type[Method]]:
    found: dict[str, type[Method]] = {}
    origin: dict[str, str] = {}

    def add(cls: type[Method], where: str) -> None:
        if cls.name in found and found[cls.name] is not cls:
            raise KdbenchError(f"{where}: method '{cls.name}' is already defined in {origin[cls.name]}")
        found[cls.name], origin[cls.name] = cls, where

    for folder in method_dirs():
        for path in sorted(folder.glob("*.py")):
            if not path.name.startswith("_"):
                for cls in _classes_in(_load_file(path)):
                    add(cls, str(path))
    for ep in entry_points(group="kdbench.methods"):
        obj = ep.load()
        for cls in ([obj] if inspect.isclass(obj) else _classes_in(obj)):
            add(cls, f"entry point {ep.name}")
    return dict(sorted(found.items()))


def get_method(name: str) -> type[Method]:
    registry = methods()
    if name not in registry:
        raise KdbenchError(f"unknown method '{name}' (known: {', '.join(registry)})")
    return registry[name]


# The kdbench modules whose code is part of every method's numbers besides its own file: the contract
# (the default step(), run_model, feature hooks) and the shared losses. A fix there must retrain the
# methods. The engine, data pipeline and models are left out on purpose: they are shared by every job,
# so a hash over them would retrain everything after any edit; a change there that changes numbers
# bumps plan.STORE_VERSION instead.
CONTRACT_MODULES = (method, losses)


def normalized_source(path: str) -> str:
    """A Python file's code without comments, docstrings or formatting: editing those changes no number."""
    text = Path(path).read_text()
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return text
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def method_hash(name: str) -> str:
    """A hash of the code that decides a method's numbers: its plugin file (and the files of the Method
    classes it derives from) and the contract modules. Part of every job's content hash, so editing a
    plugin retrains its jobs instead of reusing the old code's results; logged as the param `method_hash`."""
    return _class_hash(get_method(name))


@lru_cache(maxsize=None)
def _class_hash(cls: type[Method]) -> str:
    files = [inspect.getsourcefile(c) for c in cls.__mro__ if isinstance(c, type) and issubclass(c, Method)
             and c is not Method]
    files += [m.__file__ for m in CONTRACT_MODULES]
    digest = hashlib.sha256()
    for f in dict.fromkeys(files):
        try:
            digest.update(normalized_source(f).encode())
        except (OSError, TypeError):  # no source (a compiled plugin): its module name stands in
            digest.update(f"{cls.__module__}.{cls.__qualname__}".encode())
    return digest.hexdigest()[:16]
