"""The method registry: every `Method` subclass found in the `methods/` folders and in installed packages, and
every `Modifier` subclass (kdbench.modifier) found in the same places, by the same rules.

Sources, from the one that wins a name to the one that yields it: `./methods` of the working directory,
folders listed in KDBENCH_METHODS (os.pathsep-separated, in order), the entry-point group
`kdbench.methods` of pip-installed packages (each entry a module or a Method subclass), and last the
built-in methods (the repository's `methods/` folder, installed as the package `kdbench.builtin_methods`).

- A file whose source is byte-identical to one already read is the same method, read once (a copy of
  the built-ins in ./methods, to edit one of them, is not a clash).
- Two different definitions of one method name: the source listed first above wins, and one line on
  stderr says which file wins over which.
- A plugin that fails to import (a syntax error) is skipped with one line on stderr; the other methods
  work, and a suite naming a method of that file fails at validation, naming the file.
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
from kdbench import losses, method, modifier
from kdbench.method import Method
from kdbench.modifier import Modifier, check_modifier

_PACKAGED = Path(__file__).resolve().parent / "builtin_methods"  # a wheel install: methods/ mapped there
BUILTIN_METHODS = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[1] / "methods"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def method_dirs() -> list[Path]:
    """Method folders, the winning one first; the built-in folder last."""
    dirs = [Path.cwd() / "methods"]
    dirs += [Path(p) for p in os.environ.get("KDBENCH_METHODS", "").split(os.pathsep) if p]
    seen, unique = {BUILTIN_METHODS.resolve()}, []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            unique.append(d)
    return unique + [BUILTIN_METHODS] if BUILTIN_METHODS.is_dir() else unique


def _classes_in(module: ModuleType, base: type = Method) -> list[type]:
    return [c for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, base) and c is not base and c.__module__ == module.__name__ and c.name]


def _load_file(path: Path, builtin: bool) -> ModuleType:
    # One module name per file: ./methods/kd.py beside the built-in kd.py must not replace it in sys.modules.
    suffix = "" if builtin else "_" + hashlib.sha256(str(path.resolve().parent).encode()).hexdigest()[:8]
    spec = importlib.util.spec_from_file_location(f"kdbench_methods.{path.stem}{suffix}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: dataclasses, pickling and inspect look a module up there
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a broken plugin must not hide which file it is
        sys.modules.pop(spec.name, None)
        where = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) and exc.lineno else ""
        text = " ".join(str(getattr(exc, "msg", None) or exc).split())
        raise KdbenchError(f"{path}: method plugin failed to import: {type(exc).__name__}: {text}{where}") from exc
    return module


_broken: dict[Path, str] = {}  # plugin file -> why it failed to import (filled by methods())
_modifiers: dict[str, type[Modifier]] = {}  # the modifiers found in the same files (filled by methods())


def broken_plugins() -> dict[Path, str]:
    """Plugin files skipped because they failed to import, with the one-line reason."""
    methods()
    return dict(_broken)


@lru_cache(maxsize=1)
def methods() -> dict[str, type[Method]]:
    found: dict[str, type[Method]] = {}
    origin: dict[str, str] = {}
    sources: set[str] = set()
    _broken.clear()
    _modifiers.clear()

    def add(cls: type, where: str) -> None:
        kind, table = ("modifier", _modifiers) if issubclass(cls, Modifier) else ("method", found)
        if cls.name in table and table[cls.name] is not cls:
            _say(f"kdbench: notice: {kind} '{cls.name}': {origin[kind + cls.name]} is used, not {where} "
                 f"(sources differ; the first of ./methods, KDBENCH_METHODS, entry points, built-ins wins)")
            return
        table[cls.name], origin[kind + cls.name] = cls, where

    def load_folder(folder: Path) -> None:
        builtin = folder == BUILTIN_METHODS
        for path in sorted(folder.glob("*.py")):
            if path.name.startswith("_"):
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest in sources:  # a byte-identical copy of a file already read: the same methods
                continue
            sources.add(digest)
            try:
                module = _load_file(path, builtin)
            except KdbenchError as exc:
                _broken[path] = str(exc)
                _say(f"kdbench: warning: {exc}; skipped")
                continue
            for cls in _classes_in(module) + _classes_in(module, Modifier):
                add(cls, str(path))

    dirs = method_dirs()
    for folder in [d for d in dirs if d != BUILTIN_METHODS]:
        load_folder(folder)
    for ep in entry_points(group="kdbench.methods"):
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001 (as for a file: say which, go on with the others)
            _broken[Path(f"entry point {ep.name}")] = f"{type(exc).__name__}: {exc}"
            _say(f"kdbench: warning: entry point {ep.name} ({ep.value}) failed to import: "
                 f"{type(exc).__name__}: {' '.join(str(exc).split())}; skipped")
            continue
        for cls in ([obj] if inspect.isclass(obj) else _classes_in(obj) + _classes_in(obj, Modifier)):
            add(cls, f"entry point {ep.name}")
    if BUILTIN_METHODS in dirs:
        load_folder(BUILTIN_METHODS)
    return dict(sorted(found.items()))


def unknown_method(name: str) -> str:
    """Why `name` is not a method: a broken plugin that may define it, else the known names."""
    registry = methods()
    for path, reason in _broken.items():
        if path.stem == name:
            return f"method '{name}' is in a plugin that failed to import: {reason}"
    broken = f"; plugins that failed to import: {', '.join(map(str, _broken))}" if _broken else ""
    return f"unknown method '{name}' (known: {', '.join(registry)}){broken}"


def get_method(name: str) -> type[Method]:
    registry = methods()
    if name not in registry:
        raise KdbenchError(unknown_method(name))
    return registry[name]


# The kdbench modules whose code is part of every method's numbers besides its own file: the contract
# (the default step(), run_model, feature hooks) and the shared losses. A fix there must retrain the
# methods. The engine, data pipeline and models are left out on purpose: they are shared by every job,
# so a hash over them would retrain everything after any edit; a change there that changes numbers
# bumps job_config.STORE_VERSION instead.
CONTRACT_MODULES = (method, losses)


# What a method class may declare that decides no job's numbers: whether its seeds may train stacked (a stacked
# job says so in its own key). Left out of the hash like comments, so declaring it keeps every job's key.
NOT_NUMBERS = ("stackable", "stack_problem")


def _declares(node: ast.AST) -> str | None:
    """The name a class-body statement defines (an assignment or a function), or None."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return node.name
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return targets[0].id if len(targets) == 1 and isinstance(targets[0], ast.Name) else None


def normalized_source(path: str) -> str:
    """A Python file's code without comments, docstrings, formatting or NOT_NUMBERS declarations: editing those
    changes no number."""
    text = Path(path).read_text()
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return text
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            node.body = [n for n in node.body if _declares(n) not in NOT_NUMBERS] or [ast.Pass()]
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
    return _files_hash(files, cls)


def _files_hash(files: list, cls: type) -> str:
    digest = hashlib.sha256()
    for f in dict.fromkeys(files):
        try:
            digest.update(normalized_source(f).encode())
        except (OSError, TypeError):  # no source (a compiled plugin): its module name stands in
            digest.update(f"{cls.__module__}.{cls.__qualname__}".encode())
    return digest.hexdigest()[:16]


def modifiers() -> dict[str, type[Modifier]]:
    """The registered modifiers (kdbench.modifier), by name: found where the methods are, by the same rules."""
    methods()
    return dict(sorted(_modifiers.items()))


def get_modifier(name: str) -> type[Modifier]:
    registry = modifiers()
    if name not in registry:
        raise KdbenchError(f"unknown modifier '{name}' (known: {', '.join(registry) or 'none'})")
    return registry[name]


def modifier_problem(name: str, params: dict, method_cls: type[Method], method_params: dict) -> str | None:
    """Why modifier `name` with `params` cannot modify this method (defaults filled in); None if it can."""
    if name not in modifiers():
        return f"unknown modifier '{name}' (known: {', '.join(modifiers()) or 'none'})"
    return check_modifier(get_modifier(name), params, method_cls, method_params)


def modifier_hash(name: str) -> str:
    """A hash of the code that decides a modifier's effect: its plugin file (and those of the Modifier classes it
    derives from) and kdbench/modifier.py, which applies it. In the hash of every job that uses it."""
    cls = get_modifier(name)
    files = [inspect.getsourcefile(c) for c in cls.__mro__ if isinstance(c, type) and issubclass(c, Modifier)
             and c is not Modifier] + [modifier.__file__]
    return _files_hash(files, cls)
