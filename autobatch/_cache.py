"""On-disk cache of probe results: JSON files written atomically, corrupt entries ignored."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import platformdirs

logger = logging.getLogger(__name__)

_FORMAT = 1


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``override``, ``$AUTOBATCH_CACHE_DIR``, or the user cache dir."""
    if override is not None:
        return Path(override)
    env = os.environ.get("AUTOBATCH_CACHE_DIR")
    return Path(env) if env else Path(platformdirs.user_cache_dir("autobatch"))


def load(key: str, directory: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """The cached entry for ``key``, or ``None`` if absent or unreadable (then it is rebuilt)."""
    path = cache_dir(directory) / f"{key}.json"
    try:
        entry = json.loads(path.read_text())
        if entry.get("format") != _FORMAT or entry.get("key") != key:
            return None
        return entry["value"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        logger.warning("ignoring unreadable probe cache entry %s (%s); it will be rebuilt", path, exc)
        return None


def store(key: str, value: dict[str, Any], directory: str | os.PathLike[str] | None = None) -> Path | None:
    """Write an entry atomically (temp file, fsync, rename); failures only log, they never break a probe.

    A reader sees the old entry or the new one, never a partial file; a temp file
    left by a failed or interrupted write is removed (it is never read: its name
    starts with a dot and ends in ``.tmp``).
    """
    folder = cache_dir(directory)
    tmp: str | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": _FORMAT, "key": key, "value": value})
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        path = folder / f"{key}.json"
        os.replace(tmp, path)
        tmp = None
        return path
    except (OSError, TypeError, ValueError) as exc:
        logger.warning("cannot write the probe cache in %s: %s", folder, exc)
        return None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
