from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autobatch import DataError
from autobatch._data import ShardSource, as_in_memory, sample_in_memory, sample_shards
from autobatch._shard_files import count_rows, read_shard, resolve_shards


def _csv(path: Path, frame: pd.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def test_numbered_shards_sort_by_number_not_text(tmp_path):
    for i in [0, 1, 2, 10, 11, 9]:
        _csv(tmp_path / f"{i}.csv", pd.DataFrame({"a": [i]}))
    assert [p.name for p in resolve_shards(tmp_path)] == ["0.csv", "1.csv", "2.csv", "9.csv", "10.csv", "11.csv"]
    assert [p.name for p in resolve_shards(str(tmp_path / "1*.csv"))] == ["1.csv", "10.csv", "11.csv"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "nope", "does not exist"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "holds no shard files"),
        (lambda d: str(d / "*.parquet"), "matches no files"),
    ],
)
def test_resolve_errors_name_the_path(tmp_path, make, message):
    spec = make(tmp_path)
    with pytest.raises(DataError) as excinfo:
        resolve_shards(spec)
    assert message in str(excinfo.value) and str(tmp_path) in str(excinfo.value)


def test_mixed_formats_are_refused(tmp_path):
    _csv(tmp_path / "0.csv", pd.DataFrame({"a": [1]}))
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "1.parquet")
    with pytest.raises(DataError) as excinfo:
        resolve_shards(tmp_path)
    assert "mix formats" in str(excinfo.value)


def test_zero_byte_ragged_and_headers_only_files(tmp_path):
    empty = tmp_path / "0.csv"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as excinfo:
        read_shard(empty)
    assert "0.csv" in str(excinfo.value) and "zero-byte" in str(excinfo.value)

    ragged = tmp_path / "1.csv"
    ragged.write_text("a,b\n1,2\n3,4,5\n")
    with pytest.raises(DataError) as excinfo:
        read_shard(ragged)
    assert "1.csv" in str(excinfo.value) and "line 3" in str(excinfo.value)

    header_only = tmp_path / "2.csv"
    header_only.write_text("a,b\n")
    with pytest.raises(DataError) as excinfo:
        read_shard(header_only)
    assert "2.csv" in str(excinfo.value) and "no rows" in str(excinfo.value)


def test_corrupt_parquet_names_the_file(tmp_path):
    bad = tmp_path / "3.parquet"
    bad.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(DataError) as excinfo:
        count_rows(bad)
    assert "3.parquet" in str(excinfo.value)


def test_a_shard_with_other_columns_is_an_error(tmp_path):
    _csv(tmp_path / "0.csv", pd.DataFrame({"a": [1], "label": [0]}))
    _csv(tmp_path / "1.csv", pd.DataFrame({"a": [1], "b": [2], "label": [0]}))
    source = ShardSource.from_spec(tmp_path, "label")
    with pytest.raises(DataError) as excinfo:
        list(source.iter_frames())
    assert "1.csv" in str(excinfo.value) and "unexpected: ['b']" in str(excinfo.value)


def test_missing_target_column_names_shard_and_columns(tmp_path):
    _csv(tmp_path / "0.csv", pd.DataFrame({"a": [1, 2]}))
    with pytest.raises(DataError) as excinfo:
        sample_shards(ShardSource.from_spec(tmp_path, "label"), k=4)
    assert "'label'" in str(excinfo.value) and "0.csv" in str(excinfo.value)


def test_count_rows_csv_honours_quoted_newlines_and_parquet_metadata(tmp_path):
    frame = pd.DataFrame({"text": ["one\nline two", "plain", "x"], "n": [1, 2, 3]})
    assert count_rows(_csv(tmp_path / "0.csv", frame)) == 3
    frame.to_parquet(tmp_path / "0.parquet")
    assert count_rows(tmp_path / "0.parquet") == 3


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (pd.DataFrame({"a": []}), None, "empty"),
        ({"a": np.zeros(3), "b": np.zeros(4)}, None, "x['b']: 4"),
        (np.zeros((3, 2)), np.zeros(2), "y: 2"),
        (pd.DataFrame({"a": [1]}), "label", "not found"),
        (np.zeros(3), "label", "not a DataFrame"),
        ("not data", None, "Unrecognized data type"),
    ],
)
def test_in_memory_validation(x, y, message):
    with pytest.raises(DataError) as excinfo:
        as_in_memory(x, y)
    assert message in str(excinfo.value)


def test_raw_bytes_match_pandas_deep_memory_usage(frame):
    data = as_in_memory(frame, "label")
    # The frame owns its arrays, so pandas' deep memory usage sees the same bytes.
    assert data.nbytes == frame.drop(columns="label").memory_usage(deep=True).sum() + frame["label"].memory_usage(deep=True)
    # Per-row sizes rank rows by their real payload: the longest sequences are the largest rows.
    lengths = frame["in1"].map(len) + frame["in2"].map(len)
    sizes = data.row_nbytes()
    assert np.corrcoef(sizes, lengths)[0, 1] > 0.99


def test_worst_rows_are_the_longest(frame):
    sample = sample_in_memory(as_in_memory(frame, "label"), k=16)
    lengths = frame["in1"].map(len) + frame["in2"].map(len)
    worst_lengths = sample.worst.x["in1"].map(len) + sample.worst.x["in2"].map(len)
    assert worst_lengths.min() >= lengths.sort_values().iloc[-16] - 1
    assert sample.random.n_samples == 16 and sample.n_samples == len(frame)


def test_shard_sample_matches_in_memory_sample(frame, shard_dirs):
    shards = sample_shards(ShardSource.from_spec(shard_dirs / "parquet", "label"), k=16)
    memory = sample_in_memory(as_in_memory(frame, "label"), k=16)
    assert shards.n_samples == len(frame)
    assert sorted(shards.worst.row_nbytes()) == sorted(memory.worst.row_nbytes())
    assert shards.largest_shard_raw_bytes > 0
    assert 0.8 < shards.raw_bytes / memory.raw_bytes < 1.25
    assert "all 5 shards" in shards.worst_scope


def test_shard_scan_beyond_budget_says_it_sampled(shard_dirs):
    sample = sample_shards(ShardSource.from_spec(shard_dirs / "csv", "label"), k=8, scan_bytes=1)
    assert "of 5 shards" in sample.worst_scope and sample.n_samples == 300
