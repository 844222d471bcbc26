"""Reading a small JSON file that must hold one object (a config.json, a tokenizer_config.json)."""
from __future__ import annotations

import json
from typing import Any, Dict, Type


def read_json_object(path: str, error: Type[Exception]) -> Dict[str, Any]:
    """The JSON object in `path`; `error` (naming the file) when it is unreadable, not UTF-8 / JSON, or not an
    object."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"cannot read {path}: {err}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
