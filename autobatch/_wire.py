"""What the probe and its trial process say to each other: batches as named arrays, replies as tagged lines.

A command is one JSON object per line on the child's stdin; the batch it trains on travels as an ``.npz``
file of named arrays plus a JSON description of how they nest (:func:`pack_batch`). The child answers one
line per command, ``@@autobatch {json}`` on its stdout (:func:`reply_line`); any other line there is
ignored (:func:`parse_reply`), so what a library prints cannot be taken for an answer.
"""

from __future__ import annotations

import json
from typing import Any

REPLY_PREFIX = "@@autobatch "


def pack_batch(inputs: Any, targets: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flatten (inputs, targets) into named arrays plus a JSON-able structure description."""
    import numpy as np

    arrays: dict[str, Any] = {}

    def flatten(value: Any, prefix: str) -> Any:
        if value is None:
            return {"type": "none"}
        if isinstance(value, dict):
            return {"type": "dict", "items": {str(k): flatten(v, f"{prefix}.{k}") for k, v in value.items()}}
        if isinstance(value, (tuple, list)):
            return {"type": "tuple", "items": [flatten(v, f"{prefix}.{i}") for i, v in enumerate(value)]}
        arrays[prefix] = np.asarray(value)
        return {"type": "array", "name": prefix}

    structure = {"x": flatten(inputs, "x"), "y": flatten(targets, "y")}
    return arrays, structure


def unpack_batch(arrays: Any, structure: dict[str, Any]) -> tuple[Any, Any]:
    """The (inputs, targets) that :func:`pack_batch` flattened into ``arrays`` and ``structure``."""

    def build(node: dict[str, Any]) -> Any:
        kind = node["type"]
        if kind == "none":
            return None
        if kind == "dict":
            return {k: build(v) for k, v in node["items"].items()}
        if kind == "tuple":
            return tuple(build(v) for v in node["items"])
        return arrays[node["name"]]

    return build(structure["x"]), build(structure["y"])


def reply_line(message: dict[str, Any]) -> str:
    """One reply as the child writes it on its stdout."""
    return REPLY_PREFIX + json.dumps(message) + "\n"


def parse_reply(line: str) -> str | None:
    """The JSON text of a reply line, or ``None`` for any other line."""
    return line[len(REPLY_PREFIX) :] if line.startswith(REPLY_PREFIX) else None
