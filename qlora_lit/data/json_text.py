"""JSON read the way data files are read: numbers kept as written (as text they are taken verbatim) and a key given
twice refused, in JSON files, JSON lines and the JSON text of a conversation cell in a CSV file alike."""

from __future__ import annotations

import json


class DuplicateKey(ValueError):
    pass


def _object(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object; a key given twice would keep only its last value, silently: refused."""
    row = dict(pairs)
    if len(row) < len(pairs):
        twice = sorted({key for key, _ in pairs if [k for k, _ in pairs].count(key) > 1})
        raise DuplicateKey(f"an object has the key {twice} more than once; only one value could be read")
    return row


def _json_constant(name: str) -> float | None:
    """NaN (what Python's json writes for a missing float) is a missing value; Infinity stays a number, refused as
    text."""
    return None if name == "NaN" else float(name)


def parse_json(text: str) -> object:
    """JSON with numbers kept as written (`4` stays "4", `1.50` "1.50"): as text they are taken verbatim."""
    return json.loads(text, parse_int=str, parse_float=str, parse_constant=_json_constant, object_pairs_hook=_object)
