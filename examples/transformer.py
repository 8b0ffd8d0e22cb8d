"""A small Transformer text classifier, trained with autobatch.fit: custom layers defined right here.

The model is how people write Transformers in Keras: a token-and-position embedding layer of its own
(``TokenAndPosition``, defined in this script, so in ``__main__``), ``MultiHeadAttention`` (memory grows with
the sequence length squared), a custom loss and a ``keras.Model`` subclass with its own ``train_step``. None
of it is registered with Keras; the probe's child gets the classes by value::

    python examples/transformer.py --ram-limit 2GiB

It prints the plan, trains, then one JSON line: the planned batch, the predicted and the measured peak.
"""

from __future__ import annotations

import argparse
import json

import keras
import numpy as np
import pandas as pd
from keras import ops

import autobatch
from autobatch._memory import peak_rss_bytes

VOCAB, MAXLEN = 2000, 192


class TokenAndPosition(keras.layers.Layer):
    """Token embedding plus a learned position embedding."""

    def __init__(self, vocab: int, maxlen: int, dim: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.vocab, self.maxlen, self.dim = vocab, maxlen, dim
        self.tokens = keras.layers.Embedding(vocab, dim)
        self.positions = keras.layers.Embedding(maxlen, dim)

    def call(self, x):  # noqa: ANN001, ANN201 (Keras tensors)
        return self.tokens(x) + self.positions(ops.arange(0, ops.shape(x)[-1]))

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "vocab": self.vocab, "maxlen": self.maxlen, "dim": self.dim}


class Classifier(keras.Model):
    """A functional model with its own train_step (which a user would extend; here it only defers to Keras)."""

    def train_step(self, data):  # noqa: ANN001, ANN201
        return super().train_step(data)


def smoothed_bce(y_true, y_pred):  # noqa: ANN001, ANN201
    """Binary cross-entropy on labels smoothed by 0.05: a custom loss function."""
    y_true = y_true * 0.9 + 0.05
    return keras.losses.binary_crossentropy(y_true, y_pred)


def build_model(dim: int = 64, heads: int = 4) -> keras.Model:
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    h = TokenAndPosition(VOCAB, MAXLEN, dim)(tokens)
    attended = keras.layers.MultiHeadAttention(heads, dim // heads)(h, h)
    h = keras.layers.LayerNormalization()(h + attended)
    h = keras.layers.LayerNormalization()(h + keras.layers.Dense(dim)(keras.layers.Dense(2 * dim, activation="relu")(h)))
    out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling1D()(h))
    model = Classifier(tokens, out, name="transformer")
    model.compile(optimizer="adam", loss=smoothed_bce, metrics=["accuracy"])
    return model


def make_frame(rows: int, seed: int = 0) -> pd.DataFrame:
    """Token sequences of heavy-tailed length (median ~40, a few at MAXLEN); the label: token 7 occurs."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(3.7, 0.6, rows).astype(int), 4, MAXLEN)
    lengths[rng.choice(rows, max(rows // 200, 1), replace=False)] = MAXLEN
    texts = [rng.integers(8, VOCAB, n) for n in lengths]
    labels = rng.random(rows) < 0.5
    for text, label in zip(texts, labels):
        if label:
            text[rng.integers(0, len(text))] = 7
    return pd.DataFrame({"tokens": texts, "label": labels.astype("float32")})


def preprocess(batch_x: pd.DataFrame, batch_y: pd.Series):  # noqa: ANN201
    """Pad each batch to its longest sequence."""
    tokens = autobatch.padding.pad_sequences_batch(list(batch_x["tokens"]), dtype="int32")
    return {"tokens": tokens}, batch_y.to_numpy("float32")


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--ram-limit", default="2GiB")
    args = parser.parse_args(argv)

    frame = make_frame(args.rows)
    model = build_model()
    history = autobatch.fit(
        model, frame[["tokens"]], frame["label"], preprocess=preprocess, epochs=args.epochs, ram_limit=args.ram_limit
    )
    plan = history.autobatch_plan
    result = {
        "batch_size": plan.batch_size,
        "predicted_peak_bytes": plan.predicted_peak_bytes,
        "measured_peak_bytes": peak_rss_bytes(),
        "loss": history.history["loss"],
        "trials": [(t.batch_size, t.peak_rss_bytes, t.fits) for t in plan.probe.trials],
        "plan_seconds": plan.probe.wall_seconds,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
