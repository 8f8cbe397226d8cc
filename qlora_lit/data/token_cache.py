"""Tokenize once: the token ids of the cleaned rows, kept on disk and reused by every rank and every later run.

The cache holds untruncated prompt and response ids, so `max_length`, `overlong` and packing are applied when it is
read (cheap) and changing them needs no new tokenization. Its key is everything that changes the ids: the sources
and how they are read (files' sizes and times, columns, encoding), the tokenizer and the prompt template.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

CACHE_VERSION = 2  # bump when what is cached changes (2: numbers in text columns as written, "4" not "4.0")


def cache_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], default=str).encode()).hexdigest()[:20]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides the ids: vocabulary, merges, normalization, pre/post-processing, special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((type(tokenizer).__name__ + special + content).encode()).hexdigest()[:16]


def write_tokens(path: Path, prompt_ids: list[list[int]], response_ids: list[list[int]], stats: dict) -> None:
    """Write atomically: the parquet file appears last, complete, so its existence means the cache is usable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{socket.gethostname()}-{os.getpid()}.tmp")  # nodes may share the folder
    ids = pa.list_(pa.int32())
    table = pa.table({"prompt_ids": pa.array(prompt_ids, ids), "response_ids": pa.array(response_ids, ids)})
    pq.write_table(table, partial)
    partial.with_suffix(".json").write_text(json.dumps(stats))
    os.replace(partial.with_suffix(".json"), path.with_suffix(".json"))
    os.replace(partial, path)


def damage(path: Path) -> str | None:
    """Why the cache file at `path` cannot be read (a copy cut short, a disk that filled under an earlier qlora_lit:
    parquet's footer, at the end, is gone), or None when its footer and the statistics beside it read."""
    try:
        pq.read_metadata(path)
        json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid and json's errors are ValueErrors
        return error_text(err)
    return None


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"  # on one line: pyarrow's end in newlines


def read_tokens(path: Path) -> tuple[list[list[int]], list[list[int]], dict]:
    table = pq.read_table(path)
    stats = json.loads(path.with_suffix(".json").read_text())
    return table.column("prompt_ids").to_pylist(), table.column("response_ids").to_pylist(), stats
