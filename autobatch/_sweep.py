"""The sweep of shorter padded lengths a trial steps through before its worst-case batch.

TensorFlow's CPU and GPU pool allocators fragment with every new shape, so the worst-case batch arriving
after a run of varied shapes peaks higher than on a fresh process (BENCHMARKS.md, benchmark 4). Each trial
first trains on the batch cut to lengths a run at its batch size meets: from the padded length of the row
nine in ten such batches hold one as long as (:func:`typical_shapes`) up to the trial's own
(:func:`sweep_lengths`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from autobatch._data import DataSample, InMemoryData
from autobatch._preprocess import Preprocess, _Preprocessed, run_preprocess
from autobatch._wire import pack_batch

DEFAULT_SWEEP_STEPS = 48
"""Steps at shorter padded lengths before each trial's worst-case steps (see :func:`sweep_lengths`)."""


def packed_shapes(batch: _Preprocessed) -> dict[str, tuple[int, ...]]:
    """Each array's shape in the batch as the trial receives it (packed by :func:`autobatch._wire.pack_batch`)."""
    return {name: array.shape for name, array in pack_batch(batch.inputs, batch.targets)[0].items()}


def sample_shapes(batches: Sequence[_Preprocessed]) -> dict[str, list[tuple[int, ...]]]:
    """Each packed array's shapes on ``batches``, in their order."""
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for batch in batches:
        for name, shape in packed_shapes(batch).items():
            shapes.setdefault(name, []).append(shape)
    return shapes


def typical_shapes(sample: DataSample, preprocess: Preprocess, batch_size: int) -> dict[str, tuple[int, ...]]:
    """Each packed array's shape on the row that nine in ten batches of ``batch_size`` hold one as large as.

    A batch pads to its largest row, so that row's own padded length is where the lengths a run at this
    batch size meets begin: at a large batch nearly every batch holds one of the longest rows (and a run
    meets few shapes), at a small one the lengths spread far down. The row is found by size among the
    largest rows sampled, else among the random ones.
    """
    quantile = 0.1 ** (1 / max(batch_size, 1))
    larger = (1 - quantile) * sample.n_samples  # rows larger than it, in the whole dataset
    if larger < sample.worst.n_samples:
        rows = sample.worst.take([min(int(larger), sample.worst.n_samples - 1)])
    else:
        order = np.argsort(sample.random.row_nbytes(), kind="stable")
        rows = sample.random.take([order[min(int(quantile * len(order)), len(order) - 1)]])
    done = run_preprocess(preprocess, InMemoryData(*rows), where=f"a typical row of a batch of {batch_size}")
    return packed_shapes(done)


def trial_sweep(
    batch: _Preprocessed,
    typical: Mapping[str, tuple[int, ...]],
    others: Mapping[str, Sequence[tuple[int, ...]]],
    steps: int,
    *,
    seed: int = 0,
) -> list[dict[str, list[int | None]]]:
    """The sweep before a trial on ``batch``: :func:`sweep_lengths` of its shapes, then ``typical``'s, then ``others``'."""
    observed = {
        name: [shape, typical.get(name, shape), *others.get(name, ())] for name, shape in packed_shapes(batch).items()
    }
    return sweep_lengths(observed, steps, seed=seed)


def sweep_lengths(
    observed: Mapping[str, Sequence[tuple[int, ...]]], steps: int, *, seed: int = 0
) -> list[dict[str, list[int | None]]]:
    """Padded lengths for a trial's sweep: up to ``steps`` entries of ``{array: [length or None per axis]}``.

    Args:
        observed: per packed array, the trial batch's shape first, then its shape on the
            row where the lengths a run at the trial's batch size meets begin (see
            :func:`typical_shapes`), then its shapes on other preprocessed batches (a
            random one, the smallest rows). An axis after the batch axis whose size differs
            between them is padded; the others are kept (``None``).
        steps: how many lengths at most.
        seed: fixes their order.

    Returns:
        One dict per sweep step. On every padded axis the lengths are spread evenly
        from the second shape's length up to, not including, the trial's own, in a
        shuffled order, and rounded down to a multiple of the lengths seen (so a
        ``preprocess`` that pads to buckets of 64 is swept over multiples of 64); each
        length once. The same fraction applies to every padded axis of a step, so arrays
        of equal lengths stay equal. No sweep where the second length is the trial's:
        batches of that size nearly all pad to the longest rows.
    """
    fractions = (np.random.default_rng([seed, 2]).permutation(steps) / max(steps, 1)).tolist()
    spans: dict[str, list[tuple[int, int, int] | None]] = {}
    for name, shapes in observed.items():
        trial = shapes[0]
        others = [shape for shape in shapes[1:] if len(shape) == len(trial)]
        axes = [_sweep_span([trial[k], *(shape[k] for shape in others)]) for k in range(1, len(trial))]
        if any(axes):
            spans[name] = axes

    def length(span: tuple[int, int, int] | None, fraction: float) -> int | None:
        if span is None:
            return None
        shortest, longest, multiple = span
        return max(multiple, int(shortest + (longest - shortest) * fraction) // multiple * multiple)

    steps_at: dict[str, Any] = {}
    for f in fractions:  # a length already swept adds nothing a run would not reuse: each once
        step = {name: [length(span, f) for span in axes] for name, axes in spans.items()}
        steps_at.setdefault(repr(step), step)
    return list(steps_at.values()) if spans else []


def _sweep_span(seen: Sequence[int]) -> tuple[int, int, int] | None:
    """``(shortest, longest, multiple)`` of one axis's sweep, from its lengths seen (the trial's first, then the
    typical row's, then the other batches'); ``None`` for an axis that never varies or has nothing to sweep."""
    if len(set(seen)) == 1 or seen[1] >= seen[0]:
        return None
    return seen[1], seen[0], math.gcd(*seen)

