"""Files shipped with the package so that the demo and the tests need no network.

Refer to them in configs as `builtin:<name>`, e.g. `builtin:tiny-llama` (a Llama-architecture model with a
byte-level BPE tokenizer, built by `scripts/build_tiny_model.py`) or `builtin:koalpaca_sample.jsonl`.
"""

from __future__ import annotations

from pathlib import Path

from qlora_lit.errors import ConfigError

ASSETS_DIR = Path(__file__).parent
PREFIX = "builtin:"


def resolve_asset(name_or_path: str) -> str:
    """Turn `builtin:<name>` into the shipped file's path; leave anything else (hub id, path) unchanged."""
    if not name_or_path.startswith(PREFIX):
        return name_or_path
    path = ASSETS_DIR / name_or_path[len(PREFIX) :]
    if not path.exists():
        shipped = sorted(p.name for p in ASSETS_DIR.iterdir() if not p.name.startswith(("_", ".")))
        raise ConfigError(f"{name_or_path!r} is not shipped with qlora_lit; builtin assets are {shipped}")
    return str(path)
