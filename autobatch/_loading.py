"""Resolve user references: ``module:function`` / ``path.py:function`` specs."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable

from autobatch.errors import ConfigError


def is_callable_spec(spec: object) -> bool:
    """Whether ``spec`` looks like ``module:function`` or ``file.py:function``."""
    if not isinstance(spec, str) or ":" not in spec:
        return False
    module, _, name = spec.rpartition(":")
    return bool(module) and name.isidentifier() and not Path(spec).exists()


def _load_module(module: str) -> Any:
    if module.endswith(".py") or os.sep in module:
        path = Path(module).resolve()
        if not path.is_file():
            raise ConfigError(f"cannot import {module!r}: no such file.")
        name = "_autobatch_user_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot import {module!r} as a Python file.")
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded
        spec.loader.exec_module(loaded)
        return loaded
    # Like `python -m`: modules in the working directory are importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(module)


def resolve_callable(spec: str, *, what: str) -> Callable[..., Any]:
    """Import ``module:function`` (or ``path/to/file.py:function``) and return the function.

    Args:
        spec: the reference.
        what: what the function is for (``"preprocess"``, ``"model"``), used in errors.

    Raises:
        ConfigError: the module cannot be imported or has no such callable.
    """
    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise ConfigError(f"`{what}` must look like 'module:function' or 'file.py:function'. Received: {spec!r}")
    try:
        loaded = _load_module(module)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot import {module!r} for `{what}`: {type(exc).__name__}: {exc}") from exc
    target = getattr(loaded, name, None)
    if not callable(target):
        raise ConfigError(f"{module!r} has no callable {name!r} (for `{what}`). Received: {spec!r}")
    return target


def callable_fingerprint(fn: Callable[..., Any]) -> str:
    """A stable fingerprint of a function's code (for cache keys)."""
    digest = hashlib.sha256(getattr(fn, "__qualname__", repr(fn)).encode())
    try:
        digest.update(inspect.getsource(fn).encode())
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        digest.update(code.co_code if code is not None else repr(fn).encode())
    return digest.hexdigest()[:16]


def spec_fingerprint(spec: str) -> str:
    """Fingerprint a ``module:function`` spec by the source file of its module."""
    module, _, name = spec.rpartition(":")
    digest = hashlib.sha256(spec.encode())
    path: Path | None = None
    if module.endswith(".py") or os.sep in module:
        path = Path(module)
    else:
        try:
            found = importlib.util.find_spec(module)
            if found is not None and found.origin:
                path = Path(found.origin)
        except (ImportError, ValueError):
            path = None
    if path is not None and path.is_file():
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
