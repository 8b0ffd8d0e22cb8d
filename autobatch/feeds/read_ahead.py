"""The background thread a streaming feed reads its next shard files on, while the current one is cut into batches.

Reading overlaps training only if it happens off the thread that serves batches;
one thread per feed is enough (files are read one after the other), started on
first use and stopped when the feed closes or is garbage-collected, so a feed
that is dropped leaves no thread behind.
"""

from __future__ import annotations

import concurrent.futures
import threading
import weakref


class BackgroundReader:
    """One lazily started reader thread for a streaming feed.

    ``stop()`` ends it (a later ``pool()`` starts a new one); the owning feed stops
    it when it is garbage-collected, without waiting.
    """

    def __init__(self, owner: object, name: str) -> None:
        self._name = name
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        weakref.finalize(owner, self.stop, wait=False)

    def pool(self) -> concurrent.futures.ThreadPoolExecutor:
        """The reader's executor (one worker thread), started if it is not running."""
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
            return self._executor

    def stop(self, *, wait: bool = True) -> None:
        """End the thread, cancelling reads not yet started (``wait``: until the running one ends)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=True)
