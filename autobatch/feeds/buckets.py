"""The size-aware bucket logic: samples grouped by length bucket, each bucket with its own batch size.

Every epoch, each bucket's samples are shuffled and cut into batches of that
bucket's size (its last batch may be smaller), and the batches of all buckets
are shuffled together (:func:`epoch_batches`): every sample exactly once per
epoch, short batches large and long batches small, each padded to its bucket's
boundary so at most one padded shape per bucket reaches the model (bounded
retracing). Samples longer than the last boundary form one more bucket
(:func:`assign_buckets`).

The padding to the boundary (:class:`BucketPadding`): ``preprocess(batch_x, batch_y)``
runs on the batch's rows as usual; when it takes a ``maxlen`` keyword it is called
with ``maxlen=boundary`` (pad exactly there, e.g. ``pad_columns(..., maxlen=maxlen)``),
and either way the feed then pads the padded axis (axis 1) of each sequence
array it returns with zeros after the values up to the boundary. Which arrays
are padded: those the probe found varying along axis 1 (``variable_leaves``,
from ``plan.probe.output_signature``), else the outputs named like the sequence
columns.

:class:`Bucketed` is what the in-memory and the streaming size-aware feeds share.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from autobatch._lengths import accepts_maxlen, fit_length
from autobatch.errors import ConfigError
from autobatch.feeds.base import BaseFeed, RawBatch

logger = logging.getLogger(__name__)

NO_DROP_REMAINDER = "a size-aware feed serves every sample once per epoch: drop_remainder=True is not supported."


def check_buckets(boundaries: Sequence[int], batch_sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    bounds = np.asarray(list(boundaries), dtype=np.int64)
    sizes = np.asarray(list(batch_sizes), dtype=np.int64)
    if bounds.ndim != 1 or not len(bounds) or (bounds < 1).any() or (np.diff(bounds) <= 0).any():
        raise ConfigError(f"`boundaries` must be strictly increasing positive ints. Received: {list(boundaries)}")
    if sizes.shape != bounds.shape or (sizes < 1).any():
        raise ConfigError(
            f"`batch_sizes` must hold one positive batch size per boundary ({len(bounds)}). "
            f"Received: {list(batch_sizes)}"
        )
    return bounds, sizes


def assign_buckets(
    lengths: np.ndarray, boundaries: np.ndarray, batch_sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each sample's bucket index, and the boundaries and batch sizes (with an overflow bucket if needed).

    Samples longer than the last boundary (data the plan did not see, such as a
    validation set) go to one more bucket, padded to their longest length, with
    a batch holding no more padded tokens than the last planned bucket's.
    """
    longest = int(lengths.max()) if len(lengths) else 0
    if longest > boundaries[-1]:
        last = max(int(batch_sizes[-1] * boundaries[-1] // longest), 1)
        logger.warning(
            "%d sample(s) are longer than the last bucket boundary %d (up to %d): they form one more bucket, "
            "padded to %d, at batch %d (as many padded positions as the last bucket's batch)",
            int((lengths > boundaries[-1]).sum()),
            int(boundaries[-1]),
            longest,
            longest,
            last,
        )
        boundaries = np.append(boundaries, longest)
        batch_sizes = np.append(batch_sizes, last)
    return np.searchsorted(boundaries, lengths, side="left"), boundaries, batch_sizes


def epoch_batches(
    bucket_of: np.ndarray, batch_sizes: np.ndarray, *, seed: int, epoch: int, shuffle: bool
) -> list[tuple[int, np.ndarray]]:
    """One epoch's batches as ``(bucket, positions)``: every position once, buckets cut then interleaved.

    Positions index ``bucket_of``. With ``shuffle`` each bucket's positions are
    permuted, then the batches of all buckets are permuted, both from
    ``(seed, epoch)``; without it buckets come in order, positions ascending.
    """
    batches: list[tuple[int, np.ndarray]] = []
    for k, size in enumerate(batch_sizes.tolist()):
        members = np.flatnonzero(bucket_of == k)
        if shuffle:
            members = members[np.random.default_rng([seed, epoch, 2, k]).permutation(len(members))]
        batches += [(k, members[i : i + size]) for i in range(0, len(members), size)]
    if shuffle:
        order = np.random.default_rng([seed, epoch, 3]).permutation(len(batches))
        batches = [batches[i] for i in order]
    return batches


class BucketPadding:
    """Calls ``preprocess`` for one batch and pads its sequence arrays to the batch's bucket boundary."""

    def __init__(self, variable: Sequence[str] | None, sequence_columns: Sequence[str]) -> None:
        self.variable = frozenset(variable) if variable else None
        self.sequence_columns = tuple(sequence_columns)

    def leaves(self) -> frozenset[str]:
        """The arrays to pad: the probe's varying ones, else those named like a sequence column."""
        if self.variable is not None:
            return self.variable
        names = set(self.sequence_columns)
        return frozenset(f"x/{name}" for name in names)

    def __call__(self, preprocess: Callable[..., Any], raw: RawBatch) -> Any:
        if raw.pad_to is None:
            return preprocess(raw.x, raw.y)
        if accepts_maxlen(preprocess):
            result = preprocess(raw.x, raw.y, maxlen=raw.pad_to)
        else:
            result = preprocess(raw.x, raw.y)
        if not isinstance(result, tuple) or len(result) != 2:
            return result  # the base names what is wrong
        inputs, targets = result
        variable = self.leaves()
        # Wider than the boundary (a preprocess padding to its own bucket): only padding can lie beyond it, as
        # no sample of the bucket is longer; drop it, so the batch is the shape the plan measured.
        return (
            fit_length(inputs, raw.pad_to, variable, "x", cut="padding"),
            fit_length(targets, raw.pad_to, variable, "y", cut="padding"),
        )


def planned_buckets(
    plan: Any, boundaries: Sequence[int] | None, batch_sizes: Sequence[int] | None, *, caller: str
) -> tuple[Sequence[int], Sequence[int]]:
    """The buckets ``caller`` is given: a :class:`~autobatch.bucket_plan.BucketPlan`'s, or ``boundaries`` and ``batch_sizes``.

    Raises:
        ConfigError: both or neither are given, only one of ``boundaries`` and ``batch_sizes``, or ``plan``
            is not a bucket plan (it has no ``boundaries``).
    """
    if plan is not None:
        if boundaries is not None or batch_sizes is not None:
            raise ConfigError(
                f"{caller} takes the buckets from `plan` or from `boundaries` and `batch_sizes`, not both. "
                f"Received: plan, boundaries={boundaries!r}, batch_sizes={batch_sizes!r}"
            )
        if not hasattr(plan, "boundaries"):
            raise ConfigError(
                f"{caller} needs a size-aware plan (a BucketPlan, from batching='size-aware'); for a fixed-batch "
                f"Plan use make_feed(x, y, plan=plan). Received: plan of type {type(plan).__name__}"
            )
        return plan.boundaries, plan.batch_sizes
    missing = [name for name, value in (("boundaries", boundaries), ("batch_sizes", batch_sizes)) if value is None]
    if missing:
        raise ConfigError(
            f"{caller} needs `plan` (a BucketPlan) or both `boundaries` and `batch_sizes`. "
            f"Received: neither plan nor {' and '.join(missing)}"
        )
    return boundaries, batch_sizes  # type: ignore[return-value]


class Bucketed(BaseFeed):
    """A feed whose batches are length buckets, each padded to its bucket's boundary.

    Subclasses call :meth:`_bucket_options` and :meth:`_init_padding` in their
    constructor, set :attr:`boundaries` and :attr:`batch_sizes`, and implement
    :meth:`_batch_bucket`.
    """

    _steps_fixed = False  # the buckets' batches per epoch vary with the shuffle

    boundaries: np.ndarray
    """Each bucket's boundary: the length its batches are padded to (an overflow bucket last, if any)."""
    batch_sizes: np.ndarray
    """Each bucket's batch size."""
    sequence_columns: tuple[str, ...]
    _padding: BucketPadding

    @staticmethod
    def _bucket_options(
        boundaries: Sequence[int], batch_sizes: Sequence[int], options: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The checked buckets; drops from ``options`` what a fixed batch size means (in place).

        Raises:
            ConfigError: the buckets are malformed, or ``drop_remainder=True`` (every sample is served).
        """
        bounds, sizes = check_buckets(boundaries, batch_sizes)
        if options.pop("drop_remainder", False):
            raise ConfigError(NO_DROP_REMAINDER)
        options.pop("batch_size", None)
        options.pop("max_batch_bytes", None)  # the probe's worst case is per fixed batch, not per bucket
        return bounds, sizes

    def _init_padding(self, variable_leaves: Sequence[str] | None, sequence_columns: Sequence[str]) -> None:
        """Pad ``variable_leaves`` to each batch's boundary; default: what ``output_signature`` marks as varying."""
        if variable_leaves is None and self.output_signature is not None:
            variable_leaves = [s.name for s in self.output_signature if len(s.shape) >= 2 and s.shape[1] is None]
        self._padding = BucketPadding(variable_leaves, sequence_columns)

    def _batch_bucket(self, index: int) -> int:
        """The bucket of batch ``index`` of this epoch."""
        raise NotImplementedError

    def batch_length(self, index: int) -> int:
        """The length batch ``index`` of this epoch is padded to (its bucket's boundary)."""
        return int(self.boundaries[self._batch_bucket(index)])

    def _call_preprocess(self, raw: RawBatch) -> Any:
        return self._padding(self.preprocess, raw)

    def _native_export(self, signature: Any) -> None:
        """Batches are padded to their bucket's boundary in Python, whatever the ``preprocess``."""
        return None
