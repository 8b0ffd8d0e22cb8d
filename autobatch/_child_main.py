"""The probe's child process: ``python -m autobatch._child_main`` (started by :mod:`autobatch._child`).

It runs :func:`autobatch._trial.serve`, the trial loop. It sits at the top of the package, above
the feeds, because the baseline the trials' growth is measured above must hold what the training
process holds besides TensorFlow and the model: autobatch's feeds and the libraries they read data
with (pandas, Arrow's Parquet reader). They are imported once the model is loaded, just before the
baseline is read.
"""

from __future__ import annotations

from autobatch._trial import serve


def preload() -> None:
    """Import the training process's feeding libraries (autobatch's feeds, Arrow's Parquet reader)."""
    import autobatch.feeds  # noqa: F401
    import pyarrow.parquet  # noqa: F401


if __name__ == "__main__":
    serve(preload)
