"""The small base every feed shares: batch index math, the preprocess call and its checks, tf.data export.

A feed is a ``keras.utils.PyDataset``: ``len(feed)`` batches per epoch, batch
``i`` by ``feed[i]``, reshuffled in ``on_epoch_end``. Subclasses say how many
samples there are and how to fetch rows ``[lo, hi)`` of the current epoch's
order; the base cuts the epoch into batches, runs ``preprocess`` and checks that
every batch has the same arrays, dtypes and ranks as the first one (or as the
probe measured), so a drifting ``preprocess`` fails on the batch that drifted
instead of deep inside TensorFlow.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import keras
import numpy as np

from autobatch._units import format_bytes
from autobatch.errors import ConfigError, PreprocessError
from autobatch.probe import Preprocess, TensorSpec, _leaves, _resolve_preprocess

logger = logging.getLogger(__name__)

SAMPLE_WEIGHT = "sample_weight"
"""Name of the sample-weight array in signatures (the probe names inputs ``x/...`` and targets ``y...``)."""


@dataclasses.dataclass(frozen=True)
class RawBatch:
    """Rows ``[lo, hi)`` of one epoch's order, before ``preprocess``."""

    x: Any
    y: Any
    sample_weight: np.ndarray | None
    where: str
    """Where the rows came from, for error messages (e.g. ``"shard 'data/3.csv'"``)."""


def _map_leaves(value: Any, fn: Callable[[str, Any], Any], prefix: str) -> Any:
    """Apply ``fn(name, leaf)`` to every array in a dict/tuple/list nest, named as the probe names them."""
    if isinstance(value, Mapping):
        return {key: _map_leaves(item, fn, f"{prefix}/{key}") for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(_map_leaves(item, fn, f"{prefix}/{i}") for i, item in enumerate(value))
    return fn(prefix, value)


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"`batch_size` must be a positive int. Received: batch_size={batch_size!r}")
    return int(batch_size)


def check_fraction(validation_split: float) -> float:
    """Validate a validation fraction in (0, 1)."""
    number = isinstance(validation_split, (int, float)) and not isinstance(validation_split, bool)
    if not number or not 0 < validation_split < 1:
        raise ConfigError(
            "`validation_split` must be a fraction strictly between 0 and 1. "
            f"Received: validation_split={validation_split!r}"
        )
    return float(validation_split)


@dataclasses.dataclass
class FeedStats:
    """Work a feed has done producing batches (reading, slicing, preprocessing), for the monitor."""

    batches: int = 0
    seconds: float = 0.0


class BaseFeed(keras.utils.PyDataset):
    """A batched, shuffled, preprocessed view of a dataset, for ``model.fit``.

    Subclasses implement :attr:`n_samples`, :meth:`_rows` and :meth:`_options`.
    """

    def __init__(
        self,
        *,
        batch_size: int,
        preprocess: Preprocess | str | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_remainder: bool = False,
        output_signature: Sequence[TensorSpec] | None = None,
        max_batch_bytes: int | None = None,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
    ) -> None:
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size)
        self.batch_size = _check_batch_size(batch_size)
        self._preprocess_arg = preprocess
        self.preprocess = _resolve_preprocess(preprocess)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_remainder = bool(drop_remainder)
        self.output_signature = tuple(output_signature) if output_signature is not None else None
        self.max_batch_bytes = max_batch_bytes
        self._epoch = 0
        self.stats = FeedStats()
        self._init_runtime()

    # ------------------------------------------------------------------ runtime state (not pickled)

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._reference: tuple[dict[str, tuple[str, int]], str] | None = None
        if self.output_signature is not None:
            specs = {s.name: (s.dtype, len(s.shape)) for s in self.output_signature}
            self._reference = (specs, "the batch the probe measured")
        self._warned_bytes = False

    def __getstate__(self) -> dict[str, Any]:
        # Locks, threads and caches stay behind; Keras' multiprocessing workers rebuild them.
        state = dict(self.__dict__)
        for key in self._runtime_keys():
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def _runtime_keys(self) -> tuple[str, ...]:
        return ("_lock", "_reference", "_warned_bytes")

    # ------------------------------------------------------------------ what subclasses provide

    @property
    def n_samples(self) -> int:
        """Samples in one epoch (all of them, before ``drop_remainder``)."""
        raise NotImplementedError

    def _rows(self, lo: int, hi: int, index: int) -> RawBatch:
        """Rows ``[lo, hi)`` of the current epoch's order, for batch ``index``."""
        raise NotImplementedError

    def split(self, validation_split: float, *, seed: int | None = None) -> tuple[BaseFeed, BaseFeed]:
        """Hold out ``validation_split`` of the data: ``(train_feed, validation_feed)``."""
        raise NotImplementedError

    def _options(self) -> dict[str, Any]:
        """Keyword arguments of this feed's constructor, to describe it and to derive split feeds."""
        return dict(
            batch_size=self.batch_size,
            preprocess=self._preprocess_arg,
            shuffle=self.shuffle,
            seed=self.seed,
            drop_remainder=self.drop_remainder,
            output_signature=self.output_signature,
            max_batch_bytes=self.max_batch_bytes,
            workers=self._workers,
            use_multiprocessing=self._use_multiprocessing,
            max_queue_size=self._max_queue_size,
        )

    # ------------------------------------------------------------------ epochs and batches

    @property
    def epoch(self) -> int:
        """The epoch whose order ``feed[i]`` serves; ``on_epoch_end`` advances it."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Serve the order of ``epoch`` (e.g. when resuming training), as if ``on_epoch_end`` had run that often."""
        if epoch < 0:
            raise ConfigError(f"`epoch` must be >= 0. Received: epoch={epoch}")
        self._epoch = int(epoch)

    def on_epoch_end(self) -> None:
        """Advance to the next epoch: a new shuffle order (Keras calls this after every epoch)."""
        self._epoch += 1

    def __len__(self) -> int:
        n = self.n_samples
        return n // self.batch_size if self.drop_remainder else math.ceil(n / self.batch_size)

    def batch_bounds(self, index: int) -> tuple[int, int]:
        """Positions ``[lo, hi)`` of batch ``index`` in the epoch's order (negative indices count from the end).

        Raises:
            IndexError: ``index`` is outside ``range(len(self))``.
        """
        count = len(self)
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError(f"batch index {index} is out of range for a feed of {count} batches.")
        lo = index * self.batch_size
        return lo, min(lo + self.batch_size, self.n_samples)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        """Batch ``index`` of the current epoch: ``(inputs, targets)``, plus sample weights when given.

        Raises:
            IndexError: ``index`` is out of range.
            DataError: a shard cannot be read.
            PreprocessError: ``preprocess`` failed or returned arrays unlike the previous batches'.
        """
        started = time.perf_counter()
        if index < 0:
            index += len(self)
        lo, hi = self.batch_bounds(index)
        raw = self._rows(lo, hi, index)
        where = f"batch {index} (rows {lo}-{hi - 1} of epoch {self._epoch}{', ' + raw.where if raw.where else ''})"
        try:
            result = self.preprocess(raw.x, raw.y)
        except PreprocessError as exc:  # already says what is wrong (e.g. the default preprocess); add where
            raise PreprocessError(f"{exc} (on {where})") from exc
        except Exception as exc:
            raise PreprocessError(
                f"preprocess raised {type(exc).__name__}: {exc} on {where}. Fix the function or the data it chokes on."
            ) from exc
        if not isinstance(result, tuple) or len(result) != 2:
            raise PreprocessError(
                f"preprocess must return a pair (inputs, targets); on {where} it returned {type(result).__name__}."
            )
        inputs, targets = result
        self._check(inputs, targets, hi - lo, where)
        with self._lock:
            self.stats.batches += 1
            self.stats.seconds += time.perf_counter() - started
        if targets is None:
            return (inputs,)
        if raw.sample_weight is not None:
            return inputs, targets, raw.sample_weight
        return inputs, targets

    def _check(self, inputs: Any, targets: Any, rows: int, where: str) -> None:
        leaves = {**_leaves(inputs, "x", where), **_leaves(targets, "y", where)}
        if not leaves:
            raise PreprocessError(f"preprocess returned no arrays on {where}.")
        for name, array in leaves.items():
            if array.ndim == 0 or array.shape[0] != rows:
                got = "a scalar" if array.ndim == 0 else f"{array.shape[0]} rows"
                raise PreprocessError(
                    f"preprocess must keep one row per sample: expected {rows} rows for {name} on {where}, "
                    f"received {got}. Do not drop or add rows in preprocess."
                )
        found = {name: (str(a.dtype), a.ndim) for name, a in leaves.items()}
        with self._lock:
            if self._reference is None:
                self._reference = (found, where)
        expected, first = self._reference
        if found.keys() != expected.keys():
            raise PreprocessError(
                f"preprocess must return the same arrays for every batch: expected {sorted(expected)} "
                f"(as on {first}), received {sorted(found)} on {where}. Return the same keys every time."
            )
        for name, (dtype, ndim) in found.items():
            if (dtype, ndim) != expected[name]:
                want_dtype, want_ndim = expected[name]
                raise PreprocessError(
                    f"preprocess must return the same dtype and rank for every batch: expected {name} as "
                    f"{want_dtype} ({want_ndim}-D, as on {first}), received {dtype} ({ndim}-D) on {where}. "
                    "Cast explicitly (e.g. .astype('float32')) and pad to the same number of axes."
                )
        if self.max_batch_bytes is not None and not self._warned_bytes:
            nbytes = sum(int(a.nbytes) for a in leaves.values())
            if nbytes > self.max_batch_bytes:
                self._warned_bytes = True
                logger.warning(
                    "%s holds %s after preprocess, more than the %s of the probe's worst-case batch: "
                    "the plan may underestimate memory. Probe with the same preprocess and data as you train on.",
                    where,
                    format_bytes(nbytes),
                    format_bytes(self.max_batch_bytes),
                )

    # ------------------------------------------------------------------ tf.data export

    def _tf_signature(self, batches: Sequence[tuple[Any, ...]], output_signature: Sequence[TensorSpec] | None) -> Any:
        import tensorflow as tf

        probe_specs = {s.name: s for s in (output_signature or ())}
        names = ("x", "y", SAMPLE_WEIGHT)
        shapes: dict[str, list[tuple[int, ...]]] = {}
        dtypes: dict[str, np.dtype] = {}
        for batch in batches:
            for part, name in zip(batch, names, strict=False):  # (x,), (x, y) or (x, y, w)

                def collect(leaf_name: str, leaf: Any) -> None:
                    array = np.asarray(leaf)
                    shapes.setdefault(leaf_name, []).append(array.shape)
                    dtypes[leaf_name] = array.dtype

                _map_leaves(part, collect, name)

        def spec(leaf_name: str, leaf: Any) -> Any:
            measured = probe_specs.get(leaf_name)
            if measured is not None:
                if len(measured.shape) != np.ndim(leaf) or np.dtype(measured.dtype) != dtypes[leaf_name]:
                    raise PreprocessError(
                        f"the output signature says {leaf_name} is {measured.dtype} ({len(measured.shape)}-D), but "
                        f"batch 0 holds {dtypes[leaf_name]} ({np.ndim(leaf)}-D). Pass the signature of this preprocess."
                    )
                return tf.TensorSpec((None, *measured.shape[1:]), tf.as_dtype(measured.dtype), name=leaf_name)
            seen = shapes[leaf_name]
            dims = tuple(d if all(s[k] == d for s in seen) else None for k, d in enumerate(seen[0]))
            return tf.TensorSpec((None, *dims[1:]), tf.as_dtype(dtypes[leaf_name]), name=leaf_name)

        return tuple(_map_leaves(part, spec, name) for part, name in zip(batches[0], names, strict=False))

    def to_tf_dataset(
        self,
        output_signature: Sequence[TensorSpec] | None = None,
        *,
        infer_batches: int = 2,
        prefetch: int | Literal["autotune"] = "autotune",
    ) -> Any:
        """This feed as a ``tf.data.Dataset`` of the same batches, prefetched with ``AUTOTUNE``.

        Each full pass over the dataset is one epoch of the feed: after the last
        batch the feed moves to the next epoch's shuffle order, as with Keras.

        Args:
            output_signature: the probe's :class:`~autobatch.TensorSpec` tuple
                (``plan.probe.output_signature``); default: the one the feed was
                built with, else inferred from the first ``infer_batches``
                batches (axes that differ between them become ``None``).
            infer_batches: how many batches to look at when inferring.
            prefetch: batches to prefetch: ``"autotune"`` (tf.data decides), or a fixed
                number — what a memory plan budgets (``plan.queue_batches``).

        Returns:
            A ``tf.data.Dataset`` of ``(inputs, targets[, sample_weight])`` with an
            exact ``element_spec`` and known cardinality ``len(self)``.

        Raises:
            PreprocessError: ``output_signature`` disagrees with the first batch's
                dtypes or ranks. A later batch that does not fit the signature
                (e.g. an axis inferred as fixed varies) fails while iterating, as
                ``tf.errors.UnknownError`` carrying the ``PreprocessError`` message:
                pass the probe's signature, or pad that axis to a fixed length.
        """
        import tensorflow as tf

        signature_specs = output_signature if output_signature is not None else self.output_signature
        count = len(self)
        if count == 0:
            raise ConfigError("the feed has no batches (drop_remainder=True with fewer samples than batch_size).")
        looked = [self[i] for i in range(min(max(infer_batches, 1), count) if signature_specs is None else 1)]
        signature = self._tf_signature(looked, signature_specs)
        flat_specs = tf.nest.flatten(signature)

        def as_tf(batch: tuple[Any, ...], index: int) -> tuple[Any, ...]:
            converted = tuple(_map_leaves(part, lambda _, leaf: np.asarray(leaf), "") for part in batch)
            for spec, array in zip(flat_specs, tf.nest.flatten(converted), strict=True):
                if not spec.shape.is_compatible_with(array.shape):
                    raise PreprocessError(
                        f"batch {index} of epoch {self._epoch} gives {spec.name} the shape {array.shape}, "
                        f"which does not fit the dataset's signature {spec.shape}. Pass "
                        "output_signature=plan.probe.output_signature (axes that vary are None there) "
                        "or pad that axis to a fixed length."
                    )
            return converted

        def generate() -> Any:
            for i in range(len(self)):
                yield as_tf(self[i], i)
            self.on_epoch_end()

        dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(count))
        return dataset.prefetch(tf.data.AUTOTUNE if prefetch == "autotune" else int(prefetch))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_samples={self.n_samples}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, seed={self.seed}, drop_remainder={self.drop_remainder}, epoch={self._epoch})"
        )
