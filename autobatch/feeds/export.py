"""A feed as a ``tf.data.Dataset``: the same batches, checked against one exact signature, produced ahead.

:meth:`TfDataExport.to_tf_dataset` wraps the feed's batches in
``Dataset.from_generator`` with an exact ``element_spec`` (the probe's signature,
or one inferred from the first batches) and a known cardinality, prefetched as
the plan budgets. Each full pass is one epoch of the feed; with ``repeat=True``
one pass serves epoch after epoch. With ``adaptive=True`` the pass follows
:meth:`~autobatch.feeds.base.BaseFeed.shrink`, serving each batch in pieces.

A feed may instead make its batches with TensorFlow ops (a :class:`NativeBatches`,
see ``feeds.native``): the generator then hands out row indices, or rows' values
and lengths, and a ``map`` pads them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, Protocol

import numpy as np

from autobatch._result import TensorSpec
from autobatch._tfdata import prefetched
from autobatch.errors import AutobatchError, ConfigError, PreprocessError

SAMPLE_WEIGHT = "sample_weight"
"""Name of the sample-weight array in signatures (the probe names inputs ``x/...`` and targets ``y...``)."""


def _map_leaves(value: Any, fn: Callable[[str, Any], Any], prefix: str) -> Any:
    """Apply ``fn(name, leaf)`` to every array in a dict/tuple/list nest, named as the probe names them."""
    if isinstance(value, Mapping):
        return {key: _map_leaves(item, fn, f"{prefix}/{key}") for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(_map_leaves(item, fn, f"{prefix}/{i}") for i, item in enumerate(value))
    return fn(prefix, value)


class NativeBatches(Protocol):
    """A feed's batches made by TensorFlow ops: what :meth:`TfDataExport._native_export` returns."""

    element_signature: Any
    """The ``tf.TensorSpec`` structure of what :meth:`element` returns."""

    def element(self, lo: int, hi: int, index: int) -> tuple[Any, ...]:
        """Rows ``[lo, hi)`` of batch ``index`` as numpy arrays for the generator, checked and counted."""
        ...

    def assemble(self, *parts: Any) -> tuple[Any, ...]:
        """The batch of one element (a ``tf.data`` map function)."""
        ...


class TfDataExport:
    """:meth:`to_tf_dataset` and the record of its latest pass, for the monitor.

    A mixin of :class:`~autobatch.feeds.base.BaseFeed`, which provides the
    batches (``len``, ``batch_bounds``, ``_serve``), the epochs (``on_epoch_end``,
    ``close``) and the attributes below.
    """

    _steps_fixed: bool = True
    """Every epoch has ``len(self)`` batches at the same ``batch_bounds`` (what ``to_tf_dataset(repeat=True)`` needs)."""

    batch_size: int
    drop_remainder: bool
    output_signature: tuple[TensorSpec, ...] | None
    _epoch: int
    _pieces: int
    _lock: threading.Lock
    _pass: list[tuple[int, int]] | None
    """``(rows, pieces of its batch)`` of each element of the latest pass (``None``: none yet, or a repeating one)."""
    _failure: AutobatchError | None

    def step_rows(self, step: int) -> int | None:
        """Rows in element ``step`` of the latest ``to_tf_dataset`` pass (``None`` if that pass has not produced it)."""
        current = self._pass
        if current is None or not 0 <= step < len(current):
            return None
        return current[step][0]

    def step_pieces(self, step: int) -> int | None:
        """How many pieces the batch of element ``step`` of the latest ``to_tf_dataset`` pass was cut into."""
        current = self._pass
        if current is None or not 0 <= step < len(current):
            return None
        return current[step][1]

    def _pop_failure(self) -> AutobatchError | None:
        """The autobatch error that stopped the latest ``to_tf_dataset`` pass, once (TensorFlow re-wraps it)."""
        with self._lock:
            failure, self._failure = self._failure, None
        return failure

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
        prefetch: int | Literal["autotune"] = 2,
        adaptive: bool = False,
        repeat: bool = False,
        epochs: int | None = None,
    ) -> Any:
        """This feed as a ``tf.data.Dataset`` of the same batches, ``prefetch`` of them produced ahead.

        Each full pass over the dataset is one epoch of the feed: as the last
        batch is produced the feed moves to the next epoch's shuffle order, as
        with Keras. A pass that stops early leaves the epoch unchanged (see the
        module's resume semantics).

        With ``repeat=True`` one pass serves epoch after epoch: train it with
        ``model.fit(..., epochs=n, steps_per_epoch=len(feed))``, as :func:`autobatch.fit`
        does. Keras then keeps one iterator for the whole ``fit`` instead of making a
        new one every epoch (on the canonical example that costs 30–50 ms an epoch,
        more with a ``PadColumns`` export, whose map function is instantiated anew),
        and the next epoch's first batches are made while the current one's last
        steps train. Pass ``epochs=n`` (the epochs the fit trains) and the pass ends
        after the last batch of its ``n``-th epoch: without it, the prefetch and
        the generator run on into an epoch that never trains, preprocessing (and,
        streaming, reading shards for) up to ``prefetch`` more batches.

        Args:
            output_signature: the probe's :class:`~autobatch.probe.TensorSpec` tuple
                (``plan.probe.output_signature``); default: the one the feed was
                built with, else inferred from the first ``infer_batches``
                batches (axes that differ between them become ``None``).
            infer_batches: how many batches to look at when inferring.
            prefetch: batches to prefetch: a fixed number — what a memory plan budgets
                (``plan.queue_batches``, 2 by default) — or ``"autotune"`` (tf.data decides,
                and may hold more than the plan budgets). A fixed number also turns tf.data's
                autotuning off for this pipeline (see ``autobatch._tfdata.prefetched``).
            adaptive: follow :meth:`shrink`: each batch is produced in ``self.pieces``
                pieces, so an epoch may hold more elements than ``len(self)``. The
                dataset then reports the rows per epoch as its ``cardinality()`` (an
                upper bound: Keras, told an unknown count, would fix every epoch at the
                first epoch's count) and each pass ends when the epoch's rows are
                served; Keras warns "Your input ran out of data" at the end of each epoch,
                which :func:`autobatch.fit` silences.
            repeat: serve every epoch from one pass (above); the dataset's cardinality
                is then infinite, or ``epochs × len(self)``. Not with ``adaptive``, nor
                for feeds whose batches per epoch vary (size-aware feeds).
            epochs: with ``repeat``, how many epochs the pass serves before it ends
                (``None``: without end). Each epoch is the feed's next one, from
                :attr:`epoch` on.

        Returns:
            A ``tf.data.Dataset`` of ``(inputs, targets[, sample_weight])`` with an
            exact ``element_spec`` and known cardinality ``len(self)`` (rows per epoch
            with ``adaptive``; with ``repeat``, ``epochs × len(self)`` or infinite).

        Raises:
            PreprocessError: ``output_signature`` disagrees with the first batch's
                dtypes or ranks. A later batch that does not fit the signature
                (e.g. an axis inferred as fixed varies) fails while iterating, as
                ``tf.errors.UnknownError`` carrying the ``PreprocessError`` message:
                pass the probe's signature, or pad that axis to a fixed length.
            ConfigError: ``repeat`` with ``adaptive``, or for a feed whose batches per epoch vary;
                ``epochs`` without ``repeat``, or not a positive int.
        """
        import tensorflow as tf

        if repeat and (adaptive or not self._steps_fixed):
            why = "adaptive=True" if adaptive else f"a {type(self).__name__}, whose batches per epoch vary"
            raise ConfigError(
                f"repeat=True needs the same batches every epoch (steps_per_epoch=len(feed)); received {why}. "
                "Pass repeat=False: Keras then makes a new iterator every epoch."
            )
        if epochs is not None:
            if not repeat:
                raise ConfigError(
                    "`epochs` bounds a repeating pass: pass repeat=True with it (without, every pass is one epoch). "
                    f"Received: epochs={epochs!r}, repeat=False"
                )
            if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
                raise ConfigError(f"`epochs` must be a positive int or None. Received: epochs={epochs!r}")
            epochs = int(epochs)
        signature_specs = output_signature if output_signature is not None else self.output_signature
        count = len(self)
        if count == 0:
            raise ConfigError("the feed has no batches (drop_remainder=True with fewer samples than batch_size).")
        looked = [
            self._serve(*self.batch_bounds(i), i, record=False)
            for i in range(min(max(infer_batches, 1), count) if signature_specs is None else 1)
        ]
        signature = self._tf_signature(looked, signature_specs)
        # Whatever the look loaded (shards) would otherwise stay resident until this feed's first epoch ends,
        # e.g. a validation feed's shards through the whole training epoch.
        self.close()
        flat_specs = tf.nest.flatten(signature)
        native = None if adaptive else self._native_export(signature)

        def make(lo: int, hi: int, index: int) -> tuple[Any, ...]:
            if native is not None:
                return native.element(lo, hi, index)
            return self._conform(self._serve(lo, hi, index), flat_specs, f"batch {index}")

        def generate() -> Iterator[tuple[Any, ...]]:
            rows_log: list[tuple[int, int]] | None = None if repeat else []
            with self._lock:
                # What the monitor reads: (rows, pieces of its batch) of each element, in order. A repeating pass
                # runs ahead into the next epoch; its batches are batch_bounds', which the monitor falls back to.
                self._pass = rows_log
            try:
                served = 0
                while True:
                    yield from self._pass_elements(make, rows_log, adaptive)
                    served += 1
                    # Past the last epoch that trains, nothing is prepared (or read ahead): the pass just ends.
                    if not repeat or (epochs is not None and served >= epochs):
                        break
            except AutobatchError as exc:
                with self._lock:
                    self._failure = exc  # TensorFlow re-raises it as UnknownError; autobatch.fit restores it
                raise

        if native is None:
            dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
        else:  # the generator hands out row indices (or rows' values and lengths); TensorFlow pads them
            dataset = tf.data.Dataset.from_generator(generate, output_signature=native.element_signature)
            dataset = dataset.map(native.assemble)
        if not adaptive:
            cardinality = count
            if repeat:
                cardinality = tf.data.INFINITE_CARDINALITY if epochs is None else count * epochs
            dataset = dataset.apply(tf.data.experimental.assert_cardinality(cardinality))
        dataset = prefetched(dataset, prefetch)
        if adaptive:
            upper = count * self.batch_size if self.drop_remainder else self.n_samples
            dataset.cardinality = lambda: tf.constant(upper, dtype=tf.int64)
        return dataset

    def _conform(self, batch: tuple[Any, ...], flat_specs: Sequence[Any], what: str) -> tuple[Any, ...]:
        """``batch`` as numpy arrays, checked against the dataset's flat ``tf.TensorSpec`` list."""
        import tensorflow as tf

        converted = tuple(_map_leaves(part, lambda _, leaf: np.asarray(leaf), "") for part in batch)
        for spec, array in zip(flat_specs, tf.nest.flatten(converted), strict=True):
            self._check_shape(spec, array.shape, what)
        return converted

    def _check_shape(self, spec: Any, shape: tuple[int, ...], what: str) -> None:
        """A :class:`PreprocessError` when ``shape`` does not fit the dataset's ``tf.TensorSpec`` ``spec``."""
        if not spec.shape.is_compatible_with(shape):
            raise PreprocessError(
                f"{what} of epoch {self._epoch} gives {spec.name} the shape {shape}, "
                f"which does not fit the dataset's signature {spec.shape}. Pass "
                "output_signature=plan.probe.output_signature (axes that vary are None there) "
                "or pad that axis to a fixed length."
            )

    def _native_export(self, signature: Any) -> NativeBatches | None:
        """How to make this feed's batches with TensorFlow ops for ``to_tf_dataset``; ``None``: in Python."""
        return None

    def _pass_elements(
        self,
        make: Callable[[int, int, int], tuple[Any, ...]],
        rows_log: list[tuple[int, int]] | None,
        adaptive: bool,
    ) -> Iterator[tuple[Any, ...]]:
        """One epoch's elements, ``make(lo, hi, batch)``: each batch whole, or (``adaptive``) in ``self.pieces``."""
        count = len(self)
        for i in range(count):
            lo, hi = self.batch_bounds(i)
            split = self._pieces if adaptive else 1
            pieces = min(split, hi - lo)
            cuts = np.linspace(lo, hi, pieces + 1).round().astype(np.int64)
            for j in range(pieces):
                element = make(int(cuts[j]), int(cuts[j + 1]), i)
                if rows_log is not None:
                    rows_log.append((int(cuts[j + 1] - cuts[j]), split))
                if i == count - 1 and j == pieces - 1:
                    # The epoch is complete once its last batch exists: advance now, not after the consumer asks
                    # for one more element (Keras stops at the known count and may never ask).
                    self.on_epoch_end()
                yield element

