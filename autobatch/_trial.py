"""The probe's trials: load the model once, then run real training steps on request.

:func:`serve` is the trial loop of the probe's child process (``python -m autobatch._child_main``,
which adds what the training process feeds the model with to the baseline). It reads one JSON
command per line on stdin and answers one line ``@@autobatch {json}`` per command on stdout
(:mod:`autobatch._wire`), so an out-of-memory kill here can never take the caller down with it.
Anything TensorFlow prints goes to stderr. :func:`session` and :func:`trial` also run in the
caller's own process for ``probe="in_process"``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from autobatch._memory import is_oom_error, peak_rss_bytes, reset_peak_rss, rss_bytes
from autobatch._tfdata import prefetched
from autobatch._wire import reply_line, unpack_batch

Preload = Callable[[], object]
"""Imports what the training process holds besides TensorFlow and the model, before the baseline is measured."""


def sliced_to(arrays: dict[str, Any], lengths: dict[str, list[int | None]]) -> dict[str, Any]:
    """``arrays`` cut to ``lengths`` (per array, one entry per axis after the batch axis; ``None`` keeps it)."""
    out = dict(arrays)
    for name, axes in lengths.items():
        out[name] = arrays[name][(slice(None), *(slice(None) if k is None else slice(0, k) for k in axes))]
    return out


def _send(out: TextIO, message: dict[str, Any]) -> None:
    out.write(reply_line(message))
    out.flush()


def _load(message: dict[str, Any], preload: Preload | None) -> tuple[Any, dict[str, Any]]:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        # Without growth TF reserves nearly all device memory up front and every trial reads "full".
        tf.config.experimental.set_memory_growth(gpu, True)
    import keras

    from autobatch._shipping import adopt_path, loads

    adopt_path(message.get("sys_path") or [])  # the caller's modules are importable here too
    ref = message["model"]
    if ref["kind"] == "file":
        objects = loads(Path(ref["custom_objects"]).read_bytes()) if ref.get("custom_objects") else None
        model = _load_file(ref["path"], objects)
    elif ref["kind"] == "builder":
        model = loads(Path(ref["path"]).read_bytes())()
    else:
        from autobatch._loading import resolve_callable

        model = resolve_callable(ref["spec"], what="model")()
    if not isinstance(model, keras.Model):
        raise TypeError(f"the model reference {ref} did not give a keras.Model, but {type(model)}")
    if not getattr(model, "compiled", False) or model.optimizer is None:
        raise ValueError("the model is not compiled: call model.compile(optimizer=..., loss=...) before probing")
    return session(model, message.get("shard"), gpu=bool(gpus), preload=preload)


def session(
    model: Any, shard: str | None, *, gpu: bool, preload: Preload | None = None
) -> tuple[tuple[Any, Any], dict[str, Any]]:
    """Ready a loaded model for trials in this process: its baseline RSS, and the shard held as streaming holds one.

    Args:
        model: the compiled ``keras.Model``, loaded.
        shard: the shard streaming holds (the largest), or ``None``.
        gpu: whether the trials run on ``GPU:0``.
        preload: imports the libraries the training process feeds the model with, before the baseline.

    Returns:
        ``(model, held shard)`` and the info the caller gets (device, baseline, parameters, ...).
    """
    import tensorflow as tf

    # The trials' growth is measured above this: TensorFlow's runtime, the model and the libraries the training
    # process feeds it with (autobatch's feeds, pandas, Arrow), before any step or shard.
    if preload is not None:
        preload()
    gc.collect()
    baseline = rss_bytes()
    held, read_peak = None, None
    if shard:
        # A first read pays one-time costs (imports, thread pools) that stay resident; measure the second.
        _hold_shard(shard)
        gc.collect()
        reset_peak_rss()
        before = rss_bytes()
        held = _hold_shard(shard)
        read_peak = max((peak_rss_bytes() or 0) - before, 0)
    device = "CPU"
    if gpu:
        details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
        device = f"GPU:0 ({details.get('device_name', 'unknown')})"
    info = {
        "ok": True,
        "reads_during_steps": held is not None,
        "held_shard_rows": 0 if held is None else len(held),
        "shard_read_peak_bytes": read_peak,
        "device": device,
        "gpu": gpu,
        "baseline_rss_bytes": baseline,
        "param_count": int(model.count_params()),
        "model_name": model.name,
    }
    return (model, held), info


def _load_file(path: str, objects: dict[str, Any] | None) -> Any:
    """The caller's model from its ``.keras`` file (its own, just saved: its Lambda layers' code may be loaded).

    A subclassed model whose layers are made in ``__init__`` but built only by a call cannot take its weights
    from the file as is: it is rebuilt from its config, called once on zeros of the shape it was built with,
    then given the caller's weights (``weights.npz`` beside the file) and its compile config.
    """
    import zipfile

    import keras
    import numpy as np

    try:
        return keras.saving.load_model(path, custom_objects=objects, safe_mode=False)
    except Exception:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
        shape = (config.get("build_config") or {}).get("input_shape")
        if shape is None:
            raise
        compile_config = config.pop("compile_config", None)
        model = keras.saving.deserialize_keras_object(config, custom_objects=objects, safe_mode=False)

        def zeros(spec: Any) -> Any:
            if isinstance(spec, dict):
                return {k: zeros(v) for k, v in spec.items()}
            if isinstance(spec, (list, tuple)) and spec and isinstance(spec[0], (list, tuple, dict)):
                return [zeros(v) for v in spec]
            return np.zeros([1 if d is None else d for d in spec], dtype="float32")

        model(zeros(shape))
        weights = Path(path).with_name("weights.npz")
        if weights.is_file():  # the caller's weights in the order its layers made them (the same code here)
            with np.load(weights) as arrays:
                try:
                    model.set_weights([arrays[f"w{i}"] for i in range(len(arrays.files))])
                except ValueError as exc:
                    raise ValueError(
                        f"{type(model).__name__} rebuilt from its get_config() is not the caller's model ({exc}): its "
                        "get_config() does not give back every __init__ argument"
                    ) from None
        if compile_config:
            model.compile_from_config(compile_config)
        return model


def _hold_shard(path: str) -> Any:
    """Read one shard on a worker thread, as the streaming feed does, and keep it resident.

    This puts the reader's own footprint (pandas/Arrow pools, a thread's allocator
    arena, one shard of rows) into every trial's measurement.
    """
    from concurrent.futures import ThreadPoolExecutor

    from autobatch._shard_files import read_shard

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(read_shard, Path(path)).result()


class _ReadAhead:
    """Read a shard over and over on a worker thread while steps run, as a streaming feed reads the next file.

    The step's allocations and the reader's interleave in the allocator (and each
    thread's arena keeps what it freed), so the peak of both together is more than
    their peaks measured apart; only running them together measures it. At any
    time one shard read ahead is resident or being read, next to the held one.
    """

    def __init__(self, path: str | None) -> None:
        import threading

        self._path = path
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="autobatch-trial-reader", daemon=True)

    def _run(self) -> None:
        from autobatch._shard_files import read_shard

        latest = None
        try:
            while not self._stop.is_set():
                latest = None  # noqa: F841  (dropped before the next read, as the feed drops a finished shard)
                latest = read_shard(Path(self._path))  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 (reported by __exit__: a trial without its read-ahead measured less)
            self.error = exc

    def __enter__(self) -> _ReadAhead:
        if self._path is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.error is not None and exc[0] is None:
            raise RuntimeError(f"reading shard {self._path!r} during the trial failed: {self.error}") from self.error


def trial(model: Any, message: dict[str, Any], gpu: bool, shard: str | None = None) -> dict[str, Any]:
    """Train ``steps`` steps on the batch through ``tf.data`` and ``model.fit``, as training will, measuring the peak.

    The message's ``sweep`` (a list of per-array lengths) adds one step per entry before those, on
    the batch cut to shorter padded lengths. With ``shard`` (streaming), the shard is read again
    and again on a thread during the steps.
    """
    import numpy as np
    import tensorflow as tf

    with np.load(message["arrays"], allow_pickle=False) as loaded:
        arrays = {name: loaded[name] for name in loaded.files}
    rows, batch_size = int(message.get("rows", 0)), int(message.get("batch_size", 0))
    if 0 < rows < batch_size:
        # Cycle the worst rows to the batch size (the caller sent them once, preprocessed and padded).
        cycle = np.arange(batch_size) % rows
        arrays = {
            name: np.take(a, cycle, axis=0) if a.ndim and a.shape[0] == rows else a for name, a in arrays.items()
        }
    structure = message["structure"]
    steps = int(message.get("steps", 3))

    def element_of(named: dict[str, Any]) -> tuple[Any, ...]:
        x, y = unpack_batch(named, structure)
        return (x, y) if y is not None else (x,)

    element = element_of(arrays)
    # Shorter padded lengths first, as training meets them: the allocator's state after varied shapes (its
    # fragmentation) is part of the peak the full worst-case batch then reaches.
    sweep = [element_of(sliced_to(arrays, lengths)) for lengths in message.get("sweep") or ()]
    signature = tf.nest.map_structure(
        lambda a, *others: tf.TensorSpec(
            (None, *(d if all(o.shape[k] == d for o in others) else None for k, d in enumerate(a.shape) if k)),
            tf.as_dtype(a.dtype),
        ),
        element,
        *sweep,
    )
    elements = [*sweep, *([element] * steps)]
    dataset = tf.data.Dataset.from_generator(lambda: iter(elements), output_signature=signature)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(len(elements)))
    dataset = prefetched(dataset, max(int(message.get("prefetch", 2)), 1))  # as the feeds' to_tf_dataset
    gc.collect()
    reset_peak_rss()
    if gpu:
        tf.config.experimental.reset_memory_stats("GPU:0")
    timing: list[float] = []

    import keras

    class StepTimes(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            timing.append(time.perf_counter() - self._start)

    with _ReadAhead(shard):
        model.fit(dataset, epochs=1, verbose=0, shuffle=False, callbacks=[StepTimes()])
    # The worst-case steps, without the first step overall (it traces the train function).
    worst_steps = timing[-steps:] if sweep else timing[1:]
    reply: dict[str, Any] = {
        "ok": True,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_bytes": rss_bytes(),
        "first_step_seconds": timing[0] if timing else None,
        "seconds_per_step": float(np.median(worst_steps)) if worst_steps else (timing[0] if timing else None),
        "gpu_peak_bytes": None,
    }
    if gpu:
        reply["gpu_peak_bytes"] = int(tf.config.experimental.get_memory_info("GPU:0")["peak"])
    del arrays, element, elements, sweep, dataset
    gc.collect()
    return reply


def error_reply(exc: Exception) -> dict[str, Any]:
    """The answer to a command that raised ``exc``."""
    return {
        "ok": False,
        "error": f"{type(exc).__name__}: {exc}",
        "oom": is_oom_error(exc),
        "traceback": traceback.format_exc(limit=8),
    }


def serve(preload: Preload | None = None) -> None:
    """Answer the probe's commands on stdin until ``exit`` or end of input (the child process's loop).

    Args:
        preload: passed to :func:`session` when the model is loaded.
    """
    # Keep the real stdout for replies; anything else printed goes to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    model: Any = None
    _held: Any = None  # the shard kept resident for the whole session, as streaming keeps one
    gpu = False
    shard: str | None = None
    for line in sys.stdin:
        if not line.strip():
            continue
        message = json.loads(line)
        try:
            if message["cmd"] == "exit":
                break
            if message["cmd"] == "load":
                (model, _held), info = _load(message, preload)
                gpu = info["gpu"]
                shard = message.get("shard") or None
                _send(out, info)
            elif message["cmd"] == "trial":
                _send(out, trial(model, message, gpu, shard))
            else:
                _send(out, {"ok": False, "error": f"unknown command {message['cmd']!r}"})
        except Exception as exc:
            _send(out, error_reply(exc))
