"""Getting the caller's model into the probe's child process, whatever classes it is made of.

The model travels as a ``.keras`` file plus, pickled with cloudpickle, every class and function of the
user's own that its config names (custom layers, a ``keras.Model`` subclass with its ``train_step``,
losses, metrics, activations): objects from ``__main__``, a notebook or a module of the user's travel by
value, library objects by reference. The child sees the caller's ``sys.path`` and working directory and
loads the file with those objects as ``custom_objects``. A zero-argument builder travels the same way.
:func:`model_ref` says which of those the child gets (a file, a builder, a ``"module:function"``) and
fingerprints the model for the probe cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from autobatch._loading import callable_fingerprint, is_callable_spec, spec_fingerprint
from autobatch.errors import ModelError

LIBRARY_PREFIXES = ("keras", "tensorflow", "tf_keras", "numpy", "builtins")
"""Modules whose objects Keras (or Python) resolves by itself: never shipped."""

WAYS_OUT = (
    "Two ways out: register each custom class or function with @keras.saving.register_keras_serializable() "
    "(and give classes whose __init__ takes more than plain values a get_config()), or pass a builder "
    "(model_builder='module:function' or a zero-argument function that builds and compiles the model). "
    "probe='in_process' measures in this process instead, where an out-of-memory trial kills it."
)
"""What a model that cannot travel as it is can do instead (said by every error about it)."""


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


def model_ref(model: Any, workdir: Path) -> tuple[dict[str, Any], str]:
    """How the child loads the model, and a fingerprint of its architecture.

    Args:
        model: a compiled ``keras.Model`` (saved into ``workdir`` with its custom objects), a ``.keras``
            file, ``"module:function"`` or a zero-argument function that builds and compiles one.
        workdir: where the files the child reads are written.

    Returns:
        The reference the child's ``load`` command carries, and the fingerprint.

    Raises:
        ModelError: no such file, not a model, not compiled, or the model cannot be saved or pickled.
    """
    if isinstance(model, (str, os.PathLike)):
        text = str(model)
        if is_callable_spec(text):
            return {"kind": "callable", "spec": text}, spec_fingerprint(text)
        path = Path(text)
        if not path.is_file():
            raise ModelError(f"model file {text!r} does not exist. Pass a .keras file, 'module:function' or a model.")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        return {"kind": "file", "path": str(path.resolve())}, digest
    import keras

    if callable(model) and not isinstance(model, keras.Model):
        return _builder_ref(model, workdir)
    if not isinstance(model, keras.Model):
        raise ModelError(
            "`model` must be a keras.Model, a .keras path, 'module:function' or a zero-argument function that "
            f"builds and compiles one. Received: {type(model)}"
        )
    if not getattr(model, "compiled", False) or model.optimizer is None:
        raise ModelError(
            f"model {model.name!r} is not compiled: call model.compile(optimizer=..., loss=...) before probing."
        )
    import numpy as np

    path = workdir / "model.keras"
    with _sending(f"model {model.name!r}", WAYS_OUT):
        model.save(path)
        objects = custom_objects(model)
        (workdir / "custom_objects.pkl").write_bytes(dumps(objects))
    if not any(c.__name__ in ("Functional", "Sequential") for c in type(model).__mro__):
        # A subclassed model may have to be rebuilt by a call in the child, then given these weights.
        np.savez(workdir / "weights.npz", **{f"w{i}": w for i, w in enumerate(model.get_weights())})
    ref = {
        "kind": "file",
        "path": str(path),
        "custom_objects": str(workdir / "custom_objects.pkl"),
        "params": int(model.count_params()),
    }
    return ref, model_fingerprint(model, objects)


def model_fingerprint(model: Any, objects: Mapping[str, Any] | None = None) -> str:
    """The architecture, compile settings and custom code of a live model, for the cache key."""
    try:
        config = json.dumps([model.to_json(), model.get_compile_config()], sort_keys=True, default=str)
    except Exception:  # noqa: BLE001 (a config that cannot be made: the class and its size stand for it)
        config = f"{describe(type(model))}:{model.count_params()}"
    digest = hashlib.sha256(config.encode())
    for name, obj in sorted((objects if objects is not None else custom_objects(model)).items()):
        digest.update(f"{name}={callable_fingerprint(obj)}".encode())  # the custom code is part of the architecture
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _sending(what: str, ways_out: str) -> Iterator[None]:
    """Any failure inside, as a :class:`ModelError` saying ``what`` could not reach the child and the ways out."""
    try:
        yield
    except Exception as exc:
        raise ModelError(
            f"cannot send {what} to the probe's child process: {type(exc).__name__}: {exc}. {ways_out}"
        ) from exc


def _builder_ref(builder: Callable[[], Any], workdir: Path) -> tuple[dict[str, Any], str]:
    """A zero-argument function that builds and compiles the model, pickled for the child."""
    with _sending(f"the model builder {describe(builder)}", "Pass it as 'module:function' instead."):
        (workdir / "builder.pkl").write_bytes(dumps(builder))
    return {"kind": "builder", "path": str(workdir / "builder.pkl")}, callable_fingerprint(builder)

