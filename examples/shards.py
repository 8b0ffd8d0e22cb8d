"""Stream numbered shards that are larger, together, than the memory training may use.

The tutorial's shard version reads ``f"{path}/{i}.csv"`` one file per step, with an
off-by-one at the last file and no way to cut files into batches. Here the data
(about 1.2 GiB in memory by default) is deliberately larger than ``--ram-limit``
(1 GiB): the plan chooses to stream, sizes the batch for what stays resident
(the current shard, one read ahead, the queue and the training step), and the
run's peak RSS is checked against the limit at the end::

    python examples/shards.py                      # Parquet shards, ~1.2 GiB of data, ram_limit 1 GiB
    python examples/shards.py --format csv --rows 40000 --ram-limit 800MiB

Writing the shards takes a few seconds the first time (they are kept in
``--out``); one epoch takes a minute or two on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

import canonical  # noqa: E402

import autobatch  # noqa: E402
from autobatch._memory import peak_rss_bytes  # noqa: E402


def write_shards(out: Path, *, rows: int, shards: int, fmt: str, seed: int = 0) -> Path:
    """Write ``rows`` rows of long sequences as numbered shards, one shard in memory at a time."""
    folder = out / f"{fmt}-{rows}"
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, part in enumerate(np.array_split(np.arange(rows), shards)):
        lengths = np.clip(rng.lognormal(mean=6.0, sigma=0.5, size=(len(part), 2)).astype(int), 16, 2048)
        frame = pd.DataFrame(
            {
                "in1": [rng.standard_normal(k).astype(np.float32) for k in lengths[:, 0]],
                "in2": [rng.standard_normal(k).astype(np.float32) for k in lengths[:, 1]],
            }
        )
        frame["label"] = (frame["in1"].map(np.mean) > 0).astype(np.int64)
        if fmt == "parquet":
            frame.to_parquet(folder / f"{i}.parquet", index=False)
        else:
            text = {c: frame[c].map(lambda a: " ".join(f"{v:.4g}" for v in a)) for c in ("in1", "in2")}
            frame.assign(**text).to_csv(folder / f"{i}.csv", index=False)
    done.write_text("ok\n")
    return folder


def build_model():
    """The canonical two-input classifier with a pooling front end, so an epoch over long sequences is quick."""
    import keras

    inputs, branches = {}, []
    for name in ("in1", "in2"):
        inputs[name] = keras.Input((None, 1), name=name)
        h = keras.layers.AveragePooling1D(8, padding="same")(inputs[name])
        h = keras.layers.Conv1D(16, 5, padding="same", activation="relu")(h)
        branches.append(keras.layers.GlobalMaxPooling1D()(h))
    out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Concatenate()(branches))
    model = keras.Model(inputs, out, name="pooled_two_sequence_classifier")
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("examples/data/large"))
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--shards", type=int, default=40)
    parser.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    parser.add_argument("--ram-limit", default="1GiB")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)

    folder = write_shards(args.out, rows=args.rows, shards=args.shards, fmt=args.format)
    limit = autobatch.parse_bytes(args.ram_limit, name="ram_limit")
    history = autobatch.fit(
        build_model(),
        str(folder),
        "label",
        preprocess=canonical.preprocess,
        epochs=args.epochs,
        validation_split=0.1,
        ram_limit=limit,
    )
    plan = history.autobatch_plan
    peak = peak_rss_bytes() or 0
    print(
        f"data {autobatch.format_bytes(plan.probe.raw_bytes)} in memory vs ram_limit {autobatch.format_bytes(limit)}: "
        f"strategy {plan.strategy}, batch {plan.batch_size}; peak RSS of this process "
        f"{autobatch.format_bytes(peak)} ({'under' if peak < limit else 'OVER'} the limit)"
    )


if __name__ == "__main__":
    main()
