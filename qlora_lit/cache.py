"""qlora_lit's cache folder: tokenized data (data/token_cache.py) and compiled code (model.compile_decoder_layers)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """`$QLORA_LIT_CACHE`, else ~/.cache/qlora_lit."""
    return Path(os.environ.get("QLORA_LIT_CACHE", Path.home() / ".cache" / "qlora_lit"))
