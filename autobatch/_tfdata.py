"""tf.data pieces the probe's trials and the feeds share, so trials train through the pipeline training uses."""

from __future__ import annotations

from typing import Any, Literal


def prefetched(dataset: Any, prefetch: int | Literal["autotune"]) -> Any:
    """``dataset`` prefetching ``prefetch`` elements; a fixed number also turns tf.data's autotuning off.

    Autotuning has nothing to tune in a pipeline of one generator and a fixed
    prefetch buffer, and its optimization thread costs time: it sleeps for
    periods that double from 10 ms (up to 60 s), and an iterator torn down
    during one of those sleeps can wait out the rest of it. Keras makes a new
    iterator every epoch, so with autotuning on, 1.3-2.6 s epochs here
    intermittently ended at 2.55 s (10 + 20 + ... + 1,280 ms), and 8-epoch fits
    took 13-26% longer. Keras turns it off too when a ``PyDataset`` has workers
    (its own queue). A pipeline built on top can turn it back on with
    ``with_options``.

    Args:
        dataset: a ``tf.data.Dataset``.
        prefetch: elements to prefetch, or ``"autotune"`` to let tf.data decide (autotuning stays on).

    Returns:
        The prefetching dataset.
    """
    import tensorflow as tf

    if prefetch == "autotune":
        return dataset.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options).prefetch(int(prefetch))
