"""What an exported file says about itself, in ``metadata_props`` under ``edgeattn.*`` keys."""
from __future__ import annotations

import json
from typing import Any

import onnx

PREFIX = "edgeattn."


def write(model: onnx.ModelProto, values: dict[str, Any]) -> None:
    """Set ``edgeattn.<key>`` entries; non-strings are stored as JSON, sorted so exports are reproducible."""
    existing = {p.key: p for p in model.metadata_props}
    for key in sorted(values):
        text = values[key] if isinstance(values[key], str) else json.dumps(values[key], sort_keys=True)
        prop = existing.get(PREFIX + key) or model.metadata_props.add()
        prop.key, prop.value = PREFIX + key, text


def read(model: onnx.ModelProto) -> dict[str, Any]:
    """The ``edgeattn.*`` entries, JSON-decoded where they are JSON."""
    out = {}
    for prop in model.metadata_props:
        if prop.key.startswith(PREFIX):
            try:
                out[prop.key[len(PREFIX):]] = json.loads(prop.value)
            except json.JSONDecodeError:
                out[prop.key[len(PREFIX):]] = prop.value
    return out
