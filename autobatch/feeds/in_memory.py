"""In-memory slicing: batches of a DataFrame, numpy arrays or dicts of arrays, each sample once per epoch."""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pandas as pd

from autobatch._data import InMemoryData, as_in_memory
from autobatch.errors import ConfigError, DataError
from autobatch.feeds.base import BaseFeed, RawBatch, check_fraction
from autobatch.feeds.native.in_memory import NativePadding, NativeStore, build_store
from autobatch.padding import PadColumns

logger = logging.getLogger(__name__)


class InMemoryFeed(BaseFeed):
    """Batches of in-memory data for ``model.fit``: ``ceil(n / batch_size)`` per epoch, every sample once.

    The rows are reshuffled every epoch (``on_epoch_end``) from ``seed`` and the
    epoch number, so a run is reproducible. ``preprocess(batch_x, batch_y)``
    receives each batch in the types you passed (DataFrame rows, array slices,
    dicts of array slices) and returns ``(inputs, targets)``; without it
    DataFrame columns become a dict of arrays and arrays pass through.

    Args:
        x: a DataFrame, a numpy array, or a dict/tuple/list of arrays.
        y: targets (array, Series, DataFrame, dict of arrays), the name of a
            column of ``x`` (or a list of names), or ``None``.
        batch_size: samples per batch; the last batch of an epoch may be smaller.
        preprocess: ``preprocess(batch_x, batch_y) -> (inputs, targets)`` or ``"module:function"``.
        shuffle: reshuffle the samples every epoch.
        seed: seed of the shuffle (and nothing else).
        drop_remainder: drop the last, smaller batch of each epoch.
        sample_weight: per-sample weights (an array of ``n`` values, or a column
            name of ``x``), returned as the third element of each batch.
        output_signature: the probe's :class:`~autobatch.probe.TensorSpec` tuple:
            every batch is checked against it, and :meth:`to_tf_dataset` uses it.
        max_batch_bytes: the probe's worst-case bytes of one preprocessed batch;
            a larger batch logs one warning.
        nan_policy: a batch holding NaN or inf after ``preprocess``: ``"warn"``
            (once per array; counted in ``stats.nonfinite_batches``), ``"error"``
            (a ``DataError`` naming the array, the batch and the row) or ``"ignore"``.
        workers: Keras ``PyDataset`` workers (threads unless ``use_multiprocessing``).
        use_multiprocessing: let Keras use processes (the feed must pickle).
        max_queue_size: batches Keras keeps waiting when ``workers`` > 1.

    Raises:
        ConfigError: an option is out of range.
        DataError: the data is empty, of an unsupported type, lacks the target
            column, or its parts disagree on the number of rows.

    Example:
        >>> feed = InMemoryFeed(df, "label", batch_size=64, preprocess=pad)
        >>> model.fit(feed, epochs=3)
    """

    def __init__(
        self,
        x: Any,
        y: Any = None,
        *,
        batch_size: int,
        sample_weight: np.ndarray | pd.Series | str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **options)
        weights_column: str | None = None
        if isinstance(sample_weight, str):
            if not isinstance(x, pd.DataFrame) or sample_weight not in x.columns:
                columns = list(x.columns) if isinstance(x, pd.DataFrame) else None
                raise DataError(
                    f"`sample_weight` names a column ({sample_weight!r}), so `x` must be a DataFrame holding it. "
                    f"Received: x of type {type(x)}" + (f" with columns {columns}" if columns is not None else "")
                )
            weights_column = sample_weight
            sample_weight = x[sample_weight]
            x = x.drop(columns=[weights_column])
        self.data: InMemoryData = x if isinstance(x, InMemoryData) else as_in_memory(x, y)
        n = self.data.n_samples
        self.sample_weight: np.ndarray | None = None
        if sample_weight is not None:
            weights = np.asarray(sample_weight, dtype=np.float32)
            if weights.shape != (n,):
                raise DataError(
                    f"`sample_weight` must hold one weight per sample: expected shape ({n},), received {weights.shape}."
                )
            self.sample_weight = weights
        self._indices = np.arange(n, dtype=np.int64)
        self._check_not_empty()

    def _check_not_empty(self) -> None:
        if self.drop_remainder and self.n_samples < self.batch_size:
            raise ConfigError(
                f"drop_remainder=True with batch_size={self.batch_size} leaves no batch of the {self.n_samples} "
                "samples. Lower the batch size or keep the remainder."
            )

    @classmethod
    def _subset(cls, parent: InMemoryFeed, indices: np.ndarray, **overrides: Any) -> InMemoryFeed:
        """A feed over ``indices`` of ``parent``'s rows, sharing its data (no copy)."""
        feed = cls.__new__(cls)
        BaseFeed.__init__(feed, **{**parent._options(), **overrides})
        feed.data = parent.data
        feed.sample_weight = parent.sample_weight
        feed._indices = np.asarray(indices, dtype=np.int64)
        feed._check_not_empty()
        return feed

    def _runtime_keys(self) -> tuple[str, ...]:
        return (*super()._runtime_keys(), "_order", "_native")

    def _init_runtime(self) -> None:
        super()._init_runtime()
        self._order: tuple[int, np.ndarray] | None = None
        self._native: NativeStore | Literal[False] | None = None

    def _native_export(self, signature: Any) -> NativePadding | None:
        """With a :class:`~autobatch.PadColumns` ``preprocess``, TensorFlow pads the batches (see ``feeds.native``)."""
        pad = self.preprocess
        if not isinstance(pad, PadColumns) or not pad.pads_in_tensorflow:
            return None
        if self._native is None:
            x, y = self.data.take(self._indices)
            store = build_store(
                pad,
                x,
                y,
                rows=self._indices,
                n_data=self.data.n_samples,
                sample_weight=self.sample_weight,
                check_nonfinite=self.nan_policy != "ignore",
                describe_row=self._describe_row,
            )
            self._native = store or False  # False: this data pads in Python
        if not self._native:
            return None
        return NativePadding.export(self, pad, self._native, signature)

    @property
    def native_bytes(self) -> int:
        """Bytes the tf.data export holds besides the data (padded values and targets; 0 before one, or in Python)."""
        return self._native.nbytes if self._native else 0

    @property
    def n_samples(self) -> int:
        return len(self._indices)

    def epoch_order(self) -> np.ndarray:
        """Row indices (into the data) in the current epoch's order."""
        cached = self._order
        if cached is not None and cached[0] == self._epoch:
            return cached[1]
        epoch = self._epoch
        if self.shuffle:
            order = self._indices[np.random.default_rng([self.seed, epoch]).permutation(len(self._indices))]
        else:
            order = self._indices
        self._order = (epoch, order)
        return order

    def _rows(self, lo: int, hi: int, index: int) -> RawBatch:
        rows = self.epoch_order()[lo:hi]
        batch_x, batch_y = self.data.take(rows)
        weights = self.sample_weight[rows] if self.sample_weight is not None else None
        return RawBatch(batch_x, batch_y, weights, "", origin=lambda p: self._describe_row(int(rows[p])))

    def _describe_row(self, row: int) -> str:
        """``row`` (a position in the data) as a message names it, with its index label for a DataFrame."""
        text = f"row {row} of the data"
        index = getattr(self.data.x, "index", None)
        if index is not None:
            label = index[row]
            text += f" (index label {label.item() if isinstance(label, np.generic) else label!r})"
        return text

    def split(self, validation_split: float, *, seed: int | None = None) -> tuple[InMemoryFeed, InMemoryFeed]:
        """Split off a random ``validation_split`` fraction of the rows as a validation feed.

        The rows are drawn with ``seed`` (default: the feed's), so the split is the
        same on every run; no row is in both feeds. The validation feed keeps the
        order of the rows and never shuffles.

        Args:
            validation_split: fraction of the rows to hold out, in (0, 1).
            seed: seed of the draw.

        Returns:
            ``(train_feed, validation_feed)``, sharing this feed's data without copying it.

        Raises:
            ConfigError: the fraction is out of range or leaves either side empty.
        """
        fraction = check_fraction(validation_split)
        n = self.n_samples
        n_val = int(round(n * fraction))
        if not 0 < n_val < n:
            raise ConfigError(
                f"validation_split={fraction} of {n} samples leaves {n_val} for validation and {n - n_val} for "
                "training; both need at least one. Use a fraction that leaves samples on each side."
            )
        chosen = np.random.default_rng([self.seed if seed is None else seed, 1]).permutation(n)
        val = np.sort(self._indices[chosen[:n_val]])
        train = np.sort(self._indices[chosen[n_val:]])
        logger.info("validation split: %d training and %d validation samples", len(train), len(val))
        return (
            type(self)._subset(self, train),
            type(self)._subset(self, val, shuffle=False, drop_remainder=False),
        )
