"""The benchmark workloads: data, preprocessing, models and the tutorial's generator.

Two workloads, both from ``examples/``:

- **canonical** (``examples/canonical.py``): two float sequences of heavy-tailed length
  (median ~40, a few near 1024) and a small Conv1D classifier. Used in memory, at a
  ``small`` and a ``large`` number of rows.
- **stream** (``examples/shards.py``): longer sequences (median ~400, up to 2048)
  written as numbered Parquet and CSV shards, and the pooled classifier that keeps an
  epoch over them quick. Used for shard streaming and flat memory.

Nothing here imports TensorFlow at module level: child processes import what they need.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import canonical  # noqa: E402
import shards as stream_example  # noqa: E402

import autobatch  # noqa: E402
from autobatch.probe import TensorSpec  # noqa: E402

COLUMNS = ("in1", "in2")
DATA_DIR = Path(os.environ.get("AUTOBATCH_BENCH_DATA", ROOT / "examples" / "data" / "bench"))
"""Where generated shards are kept between runs (``$AUTOBATCH_BENCH_DATA`` overrides)."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each workload is; ``--quick`` shrinks all of them to a smoke run."""

    small_rows: int
    """Rows of the canonical frame for the small size (4,000: the bundled example data)."""
    large_rows: int
    """Rows of the canonical frame for the large size."""
    shard_rows: int
    """Rows per streaming shard."""
    stream_shards: int
    """Shards of the streaming benchmark."""
    shards_1x: int
    """Shards of the 1× run of the flat-memory benchmark."""
    shards_10x: int
    """Shards of the 10× run."""
    stream_batch_size: int
    """Batch size of the streaming benchmarks (fixed, so only the feed differs)."""
    reps: int
    """Interleaved repetitions of every timed comparison without a target."""
    target_reps: int
    """Interleaved repetitions of the timed comparisons that carry a target (1 and 2): a pair's ratio moves by ±10%
    on this machine, and the median of 5 pairs by ±4%, as much as a target leaves."""
    epochs: int
    """Epochs of the child training runs that only need a plan (the large size)."""
    long_epochs: int
    """Epochs of the small size's ``autobatch.fit`` runs, the planning benchmark's: long enough for the step's
    memory to settle (TensorFlow's allocators fragment with every new padded shape, and a run's peak rises over
    its first ~30 epochs of 5 batches), since a plan must hold for the whole of a real training run."""
    canonical_shards: int = 8
    """Shards the ``large`` canonical frame is cut into for the streaming benchmark."""
    min_run_seconds: float = 2.0
    """Each timed run of the feed and shard benchmarks trains as many epochs (of the same batches) as it takes to
    last this long: a run of a 0.5-second epoch varies by more than the feed's cost."""
    fit_epochs: int = 8
    """Epochs of each ``model.fit`` call comparing Keras' ``PyDataset`` path with ``to_tf_dataset`` (Keras makes a
    new iterator every epoch, which is where the two pipelines differ)."""
    tutorial_batch_size: int = 8
    """The tutorial's batch size."""
    padding_batch_size: int = 64
    """Batch size of the padding benchmark (many batches per epoch, so many shapes)."""
    xla_rows: int = 512
    """Rows of the XLA part of the padding benchmark (every new shape compiles, seconds each)."""
    sizes: tuple[str, ...] = ("small", "large")
    """Which sizes of the canonical workload the feed and probe benchmarks run at."""
    safeties: tuple[float, ...] = (0.1, 0.05, 0.0)
    """The ``safety`` margins the planning benchmark plans with (0.1, the default under ``autobatch.fit``, first)."""
    ram_limit: str = "1GiB"
    bisect_tolerance: float = 0.02
    """Bisection stops when the gap between fitting and failing batches is below this fraction."""
    max_bisect_runs: int = 10
    sized_rows: int | None = None
    """Rows of the real-length workload of the size-aware benchmark (``None``: all ~7,000)."""
    sized_grid: tuple[int, ...] = (16, 64)
    """Batch sizes of the size-aware probe's grid."""
    sized_files: int | None = None
    """Standard-library modules whose functions give the real lengths (``None``: all)."""
    sized_probed: bool = True
    """Plan both batchings with ``autobatch.fit`` in child processes (``--quick`` instead takes buckets from the
    length distribution with a fixed budget of padded positions per batch: a smoke run of the timing code only)."""


FULL = Sizes(
    small_rows=4000,
    large_rows=16000,
    shard_rows=2000,
    stream_shards=10,
    shards_1x=4,
    shards_10x=40,
    stream_batch_size=256,
    reps=5,
    target_reps=11,
    epochs=2,
    long_epochs=30,
)
QUICK = Sizes(
    small_rows=300,
    large_rows=600,
    shard_rows=150,
    stream_shards=2,
    shards_1x=2,
    shards_10x=4,
    stream_batch_size=64,
    reps=1,
    target_reps=1,
    epochs=1,
    long_epochs=1,
    padding_batch_size=32,
    xla_rows=0,
    sizes=("small",),
    safeties=(0.1,),
    max_bisect_runs=1,
    sized_rows=300,
    sized_grid=(4, 8),
    sized_probed=False,
    sized_files=25,
    canonical_shards=2,
    min_run_seconds=0.0,
    fit_epochs=1,
)


# --------------------------------------------------------------------------- data


def frame(rows: int, *, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    """The canonical frame (``examples/canonical.py``) as ``(x, y)``; 4,000 rows equal ``frame.parquet``."""
    data = canonical.make_frame(rows, seed=seed)
    return data.drop(columns=["label"]), data["label"]


def canonical_shards(fmt: str, *, rows: int, shards: int) -> list[Path]:
    """The canonical frame of ``rows`` rows (the same rows as :func:`frame`) as numbered shards of unequal size.

    Written once under ``examples/data/bench`` by ``examples/canonical.py``'s own writer, which
    cuts the frame at random points so batches run across file boundaries.
    """
    folder = DATA_DIR / f"canonical-{rows}-{shards}"
    if not (folder / ".complete").exists():
        data = canonical.make_frame(rows, seed=0)
        canonical.write_shards(data, folder, shards=shards)
        (folder / ".complete").write_text("ok\n")
    return [folder / fmt / f"{i}.{fmt}" for i in range(shards)]


def stream_shards(fmt: str, *, rows_per_shard: int, shards: int) -> list[Path]:
    """Numbered shards of the streaming workload, written once under ``examples/data/bench``.

    The same seed draws the same rows whatever the format or number of shards, so
    the first ``k`` Parquet shards and ``k`` CSV shards hold the same rows.
    """
    folder = stream_example.write_shards(DATA_DIR / "stream", rows=rows_per_shard * shards, shards=shards, fmt=fmt)
    return [folder / f"{i}.{fmt}" for i in range(shards)]


def real_lengths(files: int | None = None) -> np.ndarray:
    """A real, heavy-tailed length distribution: the tokens of each function in CPython's standard library.

    Every ``def`` in the top-level modules of this interpreter's ``Lib/`` (methods and
    nested functions included), counted in Python tokens (no comments, newlines or
    indentation): 7,025 lengths, median 36, p99 466, longest 1,286 for
    Python 3.11. Cached under ``DATA_DIR`` per Python version. ``files`` reads only the first
    that many modules (``--quick``).
    """
    import ast
    import io
    import sysconfig
    import tokenize

    part = "" if files is None else f"-{files}-files"
    cache = DATA_DIR / f"stdlib-function-tokens-{sys.version_info[0]}.{sys.version_info[1]}{part}.npy"
    if cache.exists():
        return np.load(cache)
    skip = {tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    lengths: list[int] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:files]:
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
            per_line = np.zeros(text.count("\n") + 2, dtype=np.int64)
            for token in tokenize.generate_tokens(io.StringIO(text).readline):
                if token.type not in skip:
                    per_line[token.start[0]] += 1
        except (SyntaxError, UnicodeDecodeError, tokenize.TokenError, ValueError):
            continue
        cumulative = np.cumsum(per_line)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append(int(cumulative[node.end_lineno] - cumulative[node.lineno - 1]))
    array = np.asarray(lengths, dtype=np.int64)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    np.save(cache, array)
    return array


def real_length_frame(
    rows: int | None = None, *, seed: int = 0, files: int | None = None
) -> tuple[pd.DataFrame, pd.Series]:
    """One float sequence per standard-library function, as long as the function (in tokens), and a binary label.

    ``rows`` draws that many lengths at random (all of them, shuffled, when ``None``); ``files`` as for
    :func:`real_lengths`.
    """
    lengths = real_lengths(files)
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(lengths)) if rows is None else rng.choice(len(lengths), size=rows, replace=False)
    seqs = [rng.standard_normal(int(k)).astype(np.float32) for k in lengths[chosen]]
    label = pd.Series((np.array([s.mean() for s in seqs]) > 0).astype(np.float32), name="label")
    return pd.DataFrame({"seq": seqs}), label


def preprocess_seq(batch_x: Any, batch_y: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pad the one sequence column to the batch's longest (the size-aware feed then pads to the bucket)."""
    inputs = autobatch.pad_columns(batch_x, ("seq",), add_feature_axis=True)
    return inputs, np.asarray(batch_y, dtype=np.float32).reshape(-1, 1)


SEQ_SIGNATURE = (
    TensorSpec("x/seq", "float32", (None, None, 1)),
    TensorSpec("y", "float32", (None, 1)),
)


# --------------------------------------------------------------------------- preprocessing


def preprocess(batch_x: Any, batch_y: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """autobatch's way: vectorised padding to the batch's longest sequence (CSV strings parsed too)."""
    inputs = autobatch.pad_columns(batch_x, COLUMNS, add_feature_axis=True)
    return inputs, np.asarray(batch_y, dtype=np.float32).reshape(-1, 1)


PAD = autobatch.PadColumns(COLUMNS, add_feature_axis=True, target_axis=True)
"""``preprocess`` as a :class:`autobatch.PadColumns`: the same batches, padded by TensorFlow in an in-memory feed."""


def bucketed(bucket: autobatch.padding.Bucket | None) -> Any:
    """``preprocess`` padding to a length bucket (``None``: to the batch's longest sequence)."""

    def pad(batch_x: Any, batch_y: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
        inputs = autobatch.pad_columns(batch_x, COLUMNS, add_feature_axis=True, bucket=bucket)
        return inputs, np.asarray(batch_y, dtype=np.float32).reshape(-1, 1)

    pad.__name__ = f"pad_bucket_{bucket}"
    return pad


def fixed_length(maxlen: int) -> Any:
    """``preprocess`` padding every batch to ``maxlen``, as pre-padding a whole dataset does."""

    def pad(batch_x: Any, batch_y: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
        inputs = autobatch.pad_columns(batch_x, COLUMNS, add_feature_axis=True, maxlen=maxlen)
        return inputs, np.asarray(batch_y, dtype=np.float32).reshape(-1, 1)

    return pad


SIGNATURE = (
    TensorSpec("x/in1", "float32", (None, None, 1)),
    TensorSpec("x/in2", "float32", (None, None, 1)),
    TensorSpec("y", "float32", (None, 1)),
)
"""What ``autobatch.probe`` measures for ``preprocess``: the padded axis varies between batches."""


def tutorial_generator(x: pd.DataFrame, y: pd.Series, batch_size: int = 8) -> Iterator[tuple[Any, np.ndarray]]:
    """The tutorial's hand-written generator, as the README's "before" shows it.

    ``while True`` over ``df.iloc`` slices, ``keras.utils.pad_sequences`` per batch
    and column, the index reset by hand. Only two things differ from the tutorial:
    ``dtype="float32"`` and ``padding="post"`` (the tutorial's defaults would cast the
    float sequences to int32 and pad in front, so the model would see other data),
    and the feature axis this model's ``(None, 1)`` inputs need.
    """
    from keras.utils import pad_sequences

    i = 0
    while True:
        batch_x = x.iloc[i * batch_size : (i + 1) * batch_size]
        batch_y = y.iloc[i * batch_size : (i + 1) * batch_size]
        i = i + 1 if (i + 1) * batch_size < len(x) else 0  # reset by hand
        inputs = {
            name: pad_sequences(batch_x[name], dtype="float32", padding="post")[..., None] for name in COLUMNS
        }
        yield inputs, batch_y.to_numpy("float32").reshape(-1, 1)


# --------------------------------------------------------------------------- models


def build_wide_model() -> Any:
    """One sequence input ``seq`` through a 128-channel Conv1D: memory grows with batch × length."""
    import keras

    seq = keras.Input((None, 1), name="seq")
    hidden = keras.layers.Conv1D(128, 5, padding="same", activation="relu")(seq)
    out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalMaxPooling1D()(hidden))
    model = keras.Model({"seq": seq}, out, name="wide_sequence_classifier")
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return model


def build_model(kind: str = "canonical", *, jit_compile: bool | str = "auto") -> Any:
    """``"canonical"`` (Conv1D on the full sequences), ``"pooled"`` (pooling first, for long sequences) or ``"wide"``."""
    if kind == "canonical":
        model = canonical.build_model()
    elif kind == "pooled":
        model = stream_example.build_model()
    elif kind == "wide":
        model = build_wide_model()
    else:
        raise ValueError(f'`kind` must be "canonical", "pooled" or "wide". Received: kind={kind!r}')
    if jit_compile != "auto":
        model.compile(optimizer="adam", loss="binary_crossentropy", jit_compile=jit_compile)
    return model


class TraceCounter:
    """Counts how often Keras traces a model's ``train_step`` (Python in it runs once per trace).

    Install before the first ``fit``: the train function is built from
    ``model.train_step`` on first use.
    """

    def __init__(self, model: Any) -> None:
        self.count = 0
        step = model.train_step

        def counted(data: Any) -> Any:
            self.count += 1
            return step(data)

        model.train_step = counted
