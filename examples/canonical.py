"""The canonical case: two variable-length float sequence columns, a binary target.

This mirrors the well-known tutorial that slices a DataFrame per batch, pads
each batch, and yields ``({"in1": ..., "in2": ...}, y)``. Run it to write the
bundled example data::

    python examples/canonical.py --out examples/data

which writes ``frame.parquet`` (all rows), numbered CSV shards ``csv/0.csv …``
(sequences as space-separated numbers, as people write them) and Parquet shards
``parquet/0.parquet …`` (sequences as native list columns).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

MAX_LEN = 1024


def make_frame(n: int = 4000, *, seed: int = 0, max_len: int = MAX_LEN) -> pd.DataFrame:
    """Rows with two float sequences of heavy-tailed length (median ~40, a few near ``max_len``)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=3.7, sigma=0.8, size=(n, 2)).astype(int), 2, max_len)
    in1 = [rng.standard_normal(k).astype(np.float32) for k in lengths[:, 0]]
    in2 = [rng.standard_normal(k).astype(np.float32) for k in lengths[:, 1]]
    label = (np.array([a.mean() + b.mean() for a, b in zip(in1, in2)]) > 0).astype(np.int64)
    return pd.DataFrame({"in1": in1, "in2": in2, "label": label})


def _as_sequence(value: object) -> np.ndarray:
    if isinstance(value, str):  # CSV shards hold "0.1 -0.3 ..."
        return np.array(value.split(), dtype=np.float32)
    return np.asarray(value, dtype=np.float32)


def pad_batch(sequences: list[np.ndarray]) -> np.ndarray:
    """Pad to the longest sequence in the batch (per-batch padding, as the tutorial does)."""
    longest = max(len(s) for s in sequences)
    out = np.zeros((len(sequences), longest, 1), dtype=np.float32)
    for i, s in enumerate(sequences):
        out[i, : len(s), 0] = s
    return out


def preprocess(batch_x: pd.DataFrame, batch_y: pd.Series | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The tutorial's per-batch step: parse, pad each column to the batch max, name the inputs."""
    inputs = {name: pad_batch([_as_sequence(v) for v in batch_x[name]]) for name in ("in1", "in2")}
    targets = np.asarray(batch_y, dtype=np.float32).reshape(-1, 1)
    return inputs, targets


def build_model():
    """A small two-input sequence classifier, compiled."""
    import keras

    in1 = keras.Input((None, 1), name="in1")
    in2 = keras.Input((None, 1), name="in2")
    h1 = keras.layers.GlobalMaxPooling1D()(keras.layers.Conv1D(32, 5, padding="same", activation="relu")(in1))
    h2 = keras.layers.GlobalMaxPooling1D()(keras.layers.Conv1D(32, 5, padding="same", activation="relu")(in2))
    out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Concatenate()([h1, h2]))
    model = keras.Model({"in1": in1, "in2": in2}, out, name="two_sequence_classifier")
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return model


def load(path: str = "examples/data/frame.parquet") -> tuple[pd.DataFrame, pd.Series]:
    """(x, y) from the bundled frame: for ``autobatch probe examples/canonical.py:load``."""
    frame = pd.read_parquet(path)
    return frame.drop(columns=["label"]), frame["label"]


def write_shards(frame: pd.DataFrame, out: Path, *, shards: int) -> None:
    (out / "csv").mkdir(parents=True, exist_ok=True)
    (out / "parquet").mkdir(parents=True, exist_ok=True)
    # Unequal shard sizes on purpose: batches must be cut across file boundaries.
    cuts = np.sort(np.random.default_rng(1).choice(np.arange(1, len(frame)), size=shards - 1, replace=False))
    for i, part in enumerate(np.split(np.arange(len(frame)), cuts)):
        rows = frame.iloc[part]
        text = rows.assign(**{c: rows[c].map(lambda a: " ".join(f"{v:.5g}" for v in a)) for c in ("in1", "in2")})
        text.to_csv(out / "csv" / f"{i}.csv", index=False)
        rows.to_parquet(out / "parquet" / f"{i}.parquet", index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("examples/data"))
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--shards", type=int, default=12)
    args = parser.parse_args()
    frame = make_frame(args.rows)
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(args.out / "frame.parquet", index=False)
    write_shards(frame, args.out, shards=args.shards)
    (args.out / ".complete").write_text("ok\n")
    print(f"wrote {len(frame)} rows to {args.out} (frame.parquet, csv/0..{args.shards - 1}.csv, parquet/)")


if __name__ == "__main__":
    main()
