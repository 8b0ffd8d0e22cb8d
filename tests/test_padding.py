"""Padding helpers: same results as keras.utils.pad_sequences where they overlap, plus buckets."""

from __future__ import annotations

import io
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pandas as pd
import pytest

from autobatch.errors import ConfigError, DataError
from autobatch.padding import bucket_length, count_truncations, pad_columns, pad_sequences_batch


def _sequences(seed: int, *, n: int = 12, feature_shape: tuple[int, ...] = ()) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 15, size=n)
    lengths[0] = max(lengths[0], 1)  # keras reads the feature shape from the first non-empty sequence
    return [rng.standard_normal((int(k), *feature_shape)).astype(np.float32) for k in lengths]


def _through_parquet(seqs: list[np.ndarray]) -> pd.Series:
    """The sequences as ``read_parquet`` gives a list column back (2-D cells: object arrays of arrays)."""
    buffer = io.BytesIO()
    pd.DataFrame({"s": [s.tolist() for s in seqs]}).to_parquet(buffer)
    return pd.read_parquet(io.BytesIO(buffer.getvalue()))["s"]


CONTAINERS = {
    "arrays": lambda seqs: seqs,  # copied cell by cell (as read_parquet gives list cells)
    "Parquet cells": _through_parquet,
    "float64 Series": lambda seqs: pd.Series([s.astype(np.float64) for s in seqs], dtype=object),
    "lists": lambda seqs: [s.tolist() for s in seqs],  # concatenated first
}


@pytest.mark.parametrize("feature_shape", [(), (3,)])
@pytest.mark.parametrize("maxlen", [None, 1, 6, 40])
@pytest.mark.parametrize("truncating", ["pre", "post"])
@pytest.mark.parametrize("padding", ["pre", "post"])
@pytest.mark.parametrize("container", list(CONTAINERS))
def test_matches_keras_pad_sequences(feature_shape, maxlen, truncating, padding, container) -> None:
    for seed in range(5):
        sequences = _sequences(seed, feature_shape=feature_shape)
        given = CONTAINERS[container](sequences)
        ours = pad_sequences_batch(given, maxlen=maxlen, truncating=truncating, padding=padding, value=-1.5)
        theirs = keras.utils.pad_sequences(
            sequences, maxlen=maxlen, truncating=truncating, padding=padding, value=-1.5, dtype="float32"
        )
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(ours, theirs)


def test_integer_lists_and_dtype_match_keras() -> None:
    sequences = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    ours = pad_sequences_batch(sequences, dtype="int32", padding="pre", maxlen=4)
    np.testing.assert_array_equal(ours, keras.utils.pad_sequences(sequences, maxlen=4))
    assert ours.dtype == np.int32


def test_default_pads_post_to_the_batch_max() -> None:
    out = pad_sequences_batch([np.array([1.0, 2.0]), np.array([3.0, 4.0, 5.0]), np.array([])])
    np.testing.assert_array_equal(out, [[1, 2, 0], [3, 4, 5], [0, 0, 0]])
    assert out.dtype == np.float32


@pytest.mark.parametrize(
    ("length", "bucket", "expected"),
    [
        (0, "pow2", 1),
        (1, "pow2", 1),
        (5, "pow2", 8),
        (8, "pow2", 8),
        (9, "pow2", 16),
        (1, 64, 64),
        (64, 64, 64),
        (65, 64, 128),
    ],
)
def test_bucket_length(length, bucket, expected) -> None:
    assert bucket_length(length, bucket) == expected


@pytest.mark.parametrize("bucket", ["pow3", 0, -64, 2.5, True])
def test_bucket_rejects_bad_values(bucket) -> None:
    with pytest.raises(ConfigError, match="bucket"):
        bucket_length(5, bucket)


def test_bucket_pads_to_next_bucket_and_maxlen_caps_it() -> None:
    sequences = [np.arange(1, 6, dtype=np.float32), np.arange(1, 3, dtype=np.float32)]  # longest: 5
    pow2 = pad_sequences_batch(sequences, bucket="pow2")
    assert pow2.shape == (2, 8)
    np.testing.assert_array_equal(pow2[:, :5], keras.utils.pad_sequences(sequences, padding="post", dtype="float32"))
    assert not pow2[:, 5:].any()
    assert pad_sequences_batch(sequences, bucket=64).shape == (2, 64)
    capped = pad_sequences_batch(sequences, bucket=64, maxlen=4)  # the bucket never exceeds maxlen
    np.testing.assert_array_equal(
        capped, keras.utils.pad_sequences(sequences, maxlen=4, padding="post", dtype="float32")
    )


def test_numeric_strings_as_in_csv_shards_are_parsed() -> None:
    out = pad_sequences_batch(["0.5 -1 2", "3", ""], padding="post")
    np.testing.assert_array_equal(out, np.array([[0.5, -1, 2], [3, 0, 0], [0, 0, 0]], dtype=np.float32))


def _numeric_texts(seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = [
        " ".join(f"{v:.{int(rng.integers(1, 9))}g}" for v in rng.standard_normal(int(k)) * 10.0 ** rng.integers(-8, 8))
        for k in rng.integers(0, 40, size=30)
    ]
    return texts + ["", "   ", "\t1e3  nan\n-inf ", ".5 1. +2", "7"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("container", ["list", "object Series", "Arrow string Series"])
def test_numeric_text_gives_what_split_and_numpy_give(dtype, container) -> None:
    texts = _numeric_texts(seed=len(container))
    expected = pad_sequences_batch([np.array(t.split(), dtype=dtype) for t in texts], dtype=dtype)
    given = {
        "list": texts,
        "object Series": pd.Series(texts, dtype=object),
        "Arrow string Series": pd.Series(texts, dtype="string[pyarrow]"),
    }[container]
    out = pad_sequences_batch(given, dtype=dtype)
    assert out.dtype == expected.dtype
    np.testing.assert_array_equal(out, expected)  # NaNs compare equal here


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("1_000 2", [1000, 2]),  # numpy parses underscores, Arrow does not
        ("1\x1c2", [1, 2]),  # Python splits on the ASCII separators \x1c-\x1f, Arrow does not
        ("3\u00a04", [3, 4]),  # non-ASCII whitespace
    ],
)
def test_numeric_text_arrow_declines_is_parsed_per_string(text, values) -> None:
    np.testing.assert_array_equal(pad_sequences_batch([text, "5"]), [values, [5, 0]])


def test_numeric_text_with_a_missing_value_names_it() -> None:
    # As pandas reads a CSV with an empty sequence cell: the str dtype, missing as NaN.
    with pytest.raises(DataError, match="sequence 1 is missing"):
        pad_sequences_batch(pd.Series(["1 2", None], dtype="str"))


def test_regular_2d_array_and_series_inputs() -> None:
    array = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.testing.assert_array_equal(pad_sequences_batch(array, maxlen=2), array[:, 2:].astype(np.float32))
    series = pd.Series([np.array([1.0]), np.array([2.0, 3.0])])
    np.testing.assert_array_equal(pad_sequences_batch(series), [[1, 0], [2, 3]])


def test_bad_sequences_name_the_culprit() -> None:
    with pytest.raises(DataError, match="sequence 1 is a scalar"):
        pad_sequences_batch([[1.0], 2.0])
    with pytest.raises(DataError, match=r"sequence 2 has feature shape \(4,\)"):
        pad_sequences_batch([np.zeros((2, 3)), np.zeros((0,)), np.zeros((1, 4))])
    # Copied cell by cell, a (k, 1) cell would broadcast into a (k, 3) slot: the shapes are checked first.
    with pytest.raises(DataError, match=r"sequence 1 has feature shape \(1,\)") as excinfo:
        pad_sequences_batch(pd.Series([np.zeros((2, 3)), np.ones((2, 1))]))
    assert excinfo.value.row == 1
    with pytest.raises(ConfigError, match="truncating"):
        pad_sequences_batch([[1.0]], truncating="middle")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="padding"):
        pad_sequences_batch([[1.0]], padding="both")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="maxlen"):
        pad_sequences_batch([[1.0]], maxlen=-1)


def test_pad_columns_pads_each_column_to_its_own_length() -> None:
    frame = pd.DataFrame(
        {
            "in1": [np.ones(3, np.float32), np.ones(1, np.float32)],
            "in2": ["1 2 3 4 5 6 7", "8"],
            "label": [0, 1],
        }
    )
    out = pad_columns(frame, ["in1", "in2"], add_feature_axis=True)
    assert list(out) == ["in1", "in2"]
    assert out["in1"].shape == (2, 3, 1) and out["in2"].shape == (2, 7, 1)
    np.testing.assert_array_equal(out["in2"][1, :, 0], [8, 0, 0, 0, 0, 0, 0])
    capped = pad_columns(frame, ["in1", "in2"], maxlen={"in2": 4}, bucket="pow2")
    assert capped["in1"].shape == (2, 4) and capped["in2"].shape == (2, 4)
    np.testing.assert_array_equal(capped["in2"][0], [4, 5, 6, 7])  # truncating="pre" keeps the end
    with pytest.raises(DataError, match=r"\['in3'\]"):
        pad_columns(frame, ["in1", "in3"])


# --------------------------------------------------------------------------- bad values and truncation reports


def test_a_value_that_is_not_a_number_names_the_sequence_and_the_value() -> None:
    with pytest.raises(DataError) as excinfo:
        pad_sequences_batch(["0.5 1", "1.0 abc 2", "3"])
    assert "sequence 1 holds 'abc', which is not a float32 number" in str(excinfo.value)
    assert excinfo.value.row == 1
    with pytest.raises(DataError) as excinfo:
        pad_sequences_batch([[1.0, 2.0], [3.0], ["4", "x"]])
    assert "sequence 2 holds 'x'" in str(excinfo.value) and excinfo.value.row == 2
    with pytest.raises(DataError) as excinfo:
        pad_sequences_batch(["1 2", float("nan")])  # an empty CSV cell reads as NaN
    assert "sequence 1 is missing" in str(excinfo.value) and excinfo.value.row == 1


def test_pad_columns_names_the_column_and_the_row_label() -> None:
    frame = pd.DataFrame({"in1": ["1 2", "3", "1.0 abc 2"], "in2": ["1", "2", "3"]}, index=[10, 11, 12])
    with pytest.raises(DataError) as excinfo:
        pad_columns(frame, ["in2", "in1"])
    message = str(excinfo.value)
    assert message.startswith("column 'in1', row 2 of the batch (index label 12): sequence 2 holds 'abc'"), message
    assert excinfo.value.row == 2


def test_truncation_to_maxlen_is_counted_per_column() -> None:
    frame = pd.DataFrame({"a": [[1, 2, 3], [1], [1, 2, 3, 4, 5]], "b": [[1], [2], [3]]})
    with count_truncations() as outer:
        out = pad_columns(frame, ["a", "b"], maxlen=2)
        with count_truncations() as inner:
            pad_sequences_batch([[1, 2, 3]], maxlen=1)
    assert out["a"].shape == (3, 2)
    # "a": two sequences cut (3 -> 2 and 5 -> 2, dropping 1 + 3 steps); "b" fits; then one more cut of 2 steps.
    assert (outer.sequences, outer.values, outer.by_column, outer.maxlen) == (3, 6, {"a": 2}, {"a": 2})
    assert (inner.sequences, inner.values, inner.by_column) == (1, 2, {})
    with count_truncations() as none:
        pad_sequences_batch([[1, 2, 3]], bucket=64, maxlen=64)  # the bucket pads, nothing is cut
        pad_sequences_batch([[1, 2, 3]])
    assert none.sequences == 0
    pad_sequences_batch([[1, 2, 3]], maxlen=1)  # outside any block: nothing to count, nothing fails
