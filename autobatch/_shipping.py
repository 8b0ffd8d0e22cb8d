"""Getting the caller's model into the probe's child process, whatever classes it is made of.

The model travels as a ``.keras`` file plus, pickled with cloudpickle, every class and function of the
user's own that its config names (custom layers, a ``keras.Model`` subclass with its ``train_step``,
losses, metrics, activations): objects from ``__main__``, a notebook or a module of the user's travel by
value, library objects by reference. The child sees the caller's ``sys.path`` and working directory and
loads the file with those objects as ``custom_objects``. A zero-argument builder travels the same way.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LIBRARY_PREFIXES = ("keras", "tensorflow", "tf_keras", "numpy", "builtins")
"""Modules whose objects Keras (or Python) resolves by itself: never shipped."""


def _library_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return [Path(p).resolve() for p in roots]


def is_user_module(name: str) -> bool:
    """Whether module ``name`` is the user's code (``__main__``, a notebook, a file outside installed packages)."""
    if name == "__main__" or name.startswith("_autobatch_user_"):
        return True
    if name.split(".")[0] in LIBRARY_PREFIXES:
        return False
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    if module is None or file is None:
        return module is not None  # built in (no file): a library; unknown: not ours to ship
    path = Path(file).resolve()
    return not any(path.is_relative_to(root) for root in _library_roots())


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every serialized-object dict (``module`` + ``class_name``) inside a Keras config."""
    if isinstance(node, dict):
        if isinstance(node.get("module"), str) and isinstance(node.get("class_name"), str):
            yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _walk(value)


def _live_objects(model: Any) -> Iterator[Any]:
    """The classes and functions of the model's layers, loss and metrics, as this process holds them."""
    yield type(model)
    for layer in model._flatten_layers(include_self=False):
        yield type(layer)
        function = getattr(layer, "function", None)  # a Lambda layer's function
        if callable(function):
            yield function
    config = getattr(getattr(model, "_compile_config", None), "config", None) or {}
    stack = [config.get("loss"), config.get("metrics"), config.get("weighted_metrics")]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif value is not None and not isinstance(value, str):
            yield value if callable(value) and not hasattr(value, "get_config") else type(value)


def custom_objects(model: Any) -> dict[str, Any]:
    """The user's own classes and functions a Keras model is made of, keyed as Keras looks them up.

    Args:
        model: a ``keras.Model``.

    Returns:
        ``{name: class or function}`` for every object from a user module (see :func:`is_user_module`):
        from the live model (its class, its layers' classes, a ``Lambda``'s function, its loss and
        metrics), and any other object its config names (activations, initializers, ...).
    """
    import keras

    found: dict[str, Any] = {}
    for obj in _live_objects(model):
        module = getattr(obj, "__module__", "") or ""
        if is_user_module(module):
            found[keras.saving.get_registered_name(obj)] = obj
            found.setdefault(getattr(obj, "__name__", ""), obj)
    configs: list[Any] = []
    for get in (model.get_config, model.get_compile_config):
        try:
            configs.append(get())
        except Exception:  # noqa: BLE001 (a config that cannot be made is reported when the model is saved)
            continue
    for node in (n for config in configs for n in _walk(config)):
        module = node["module"]
        if not is_user_module(module):
            continue
        name = node["config"] if node["class_name"] == "function" and isinstance(node.get("config"), str) else node["class_name"]
        obj = getattr(sys.modules.get(module), name.split(">")[-1], None)
        if obj is not None:
            found.setdefault(node.get("registered_name") or name, obj)
            found.setdefault(name, obj)
    found.pop("", None)
    return found


def dumps(objects: Any) -> bytes:
    """``objects`` pickled with cloudpickle, the user's modules by value (the child may not import them)."""
    import cloudpickle

    modules = {getattr(o, "__module__", None) for o in _flatten(objects)}
    by_value = [
        sys.modules[m] for m in modules if m and m != "__main__" and m in sys.modules and is_user_module(m)
    ]
    registered = []
    try:
        for module in by_value:
            try:
                cloudpickle.register_pickle_by_value(module)
                registered.append(module)
            except ValueError:
                continue  # already registered, or not importable by name: pickled as cloudpickle decides
        return cloudpickle.dumps(objects)
    finally:
        for module in registered:
            cloudpickle.unregister_pickle_by_value(module)


def _flatten(objects: Any) -> list[Any]:
    if isinstance(objects, dict):
        return list(objects.values())
    return [objects]


def loads(data: bytes) -> Any:
    import pickle

    import cloudpickle  # noqa: F401 (by-value objects unpickle through it)

    return pickle.loads(data)


def caller_path() -> list[str]:
    """This process's ``sys.path``, with the working directory for its empty entry, for the child."""
    return [os.getcwd() if entry == "" else entry for entry in sys.path]


def adopt_path(entries: list[str]) -> None:
    """Make ``sys.path`` the caller's (its entries first, in its order, then this process's own)."""
    seen = set(entries)
    sys.path[:] = [*entries, *(e for e in sys.path if e not in seen)]


def describe(obj: Callable[..., Any] | type) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
