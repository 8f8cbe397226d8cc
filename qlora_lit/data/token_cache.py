"""Tokenize once: the token ids of the cleaned conversations, kept on disk and reused by every rank and every later run.

The cache holds each conversation's untruncated token ids, the spans of its trained positions (answers and their
ends of turn), the source it came from, its number of assistant turns and its messages (to render it again without
its earlier turns when it is longer than `max_length`), so `max_length`, `overlong`, packing, the validation split and
the sources' weights are applied when it is read (cheap) and changing them needs no new tokenization. Its key is
everything that changes the ids: the sources and how they are read (files' sizes and times, columns, encoding, the
default system prompt, what happens to bad rows), the tokenizer and the prompt template.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from qlora_lit.data.prompts import Tokens

CACHE_VERSION = 6  # bump when what is cached changes (2: numbers in text columns as written, "4" not "4.0";
# 3: conversations: ids with trained spans, sources, turns, messages; 4: a trained EOS after chat answers whose
# template ends turns with no special token; 5: a KoAlpaca row's blank input is None, not ""; 6: the assistant header
# of a template without an add_generation_prompt branch is untrained)


class CachedRow(NamedTuple):
    """One cleaned conversation as the cache keeps it."""

    tokens: Tokens
    source: int
    """Its place in data.path."""
    turns: int
    """Its assistant turns."""
    messages: str
    """The conversation as JSON (`conversations.to_json`)."""


def cache_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], default=str).encode()).hexdigest()[:20]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides the ids: vocabulary, merges, normalization, pre/post-processing, special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((type(tokenizer).__name__ + special + content).encode()).hexdigest()[:16]


def write_tokens(path: Path, rows: list[CachedRow], stats: dict) -> None:
    """Write atomically: the parquet file appears last, complete, so its existence means the cache is usable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{socket.gethostname()}-{os.getpid()}.tmp")  # nodes may share the folder
    ints = pa.list_(pa.int32())
    table = pa.table(
        {
            "input_ids": pa.array([row.tokens.ids for row in rows], ints),
            "trained": pa.array([[i for span in row.tokens.trained for i in span] for row in rows], ints),
            "source": pa.array([row.source for row in rows], pa.int32()),
            "turns": pa.array([row.turns for row in rows], pa.int32()),
            "messages": pa.array([row.messages for row in rows], pa.string()),
        }
    )
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


def read_tokens(path: Path) -> tuple[list[CachedRow], dict]:
    columns = pq.read_table(path).to_pydict()
    stats = json.loads(path.with_suffix(".json").read_text())
    rows = [
        CachedRow(Tokens(ids, list(zip(trained[::2], trained[1::2], strict=True))), source, turns, messages)
        for ids, trained, source, turns, messages in zip(
            columns["input_ids"],
            columns["trained"],
            columns["source"],
            columns["turns"],
            columns["messages"],
            strict=True,
        )
    ]
    return rows, stats
