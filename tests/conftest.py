"""Shared fixtures: small generated data in the canonical two-sequence shape, and one real probe."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import canonical  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never read or write the user's real probe cache.
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def frame() -> pd.DataFrame:
    """300 rows, heavy-tailed sequence lengths up to 128."""
    return canonical.make_frame(300, seed=3, max_len=128)


@pytest.fixture(scope="session")
def shard_dirs(tmp_path_factory: pytest.TempPathFactory, frame: pd.DataFrame) -> Path:
    out = tmp_path_factory.mktemp("shards")
    canonical.write_shards(frame, out, shards=5)
    frame.to_parquet(out / "frame.parquet", index=False)
    return out


@pytest.fixture(scope="session")
def small_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.keras"
    canonical.build_model().save(path)
    return path


@pytest.fixture(scope="session")
def model_probe(frame: pd.DataFrame, small_model_path: Path):
    """One real probe with a model (child process, real train steps), shared by many tests."""
    import autobatch

    return autobatch.probe(
        frame, "label", preprocess=canonical.preprocess, model=small_model_path, trial_batch_sizes=(4, 32, 128), cache=False
    )


def rows(n: int, *, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3)).astype(np.float32)
