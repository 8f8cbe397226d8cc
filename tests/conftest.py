"""Shared fixtures: everything offline, on the CPU, with the tiny model and sample data the package ships."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_MODEL = "builtin:tiny-llama"
SAMPLE_DATA = "builtin:koalpaca_sample.jsonl"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own data cache, never the user's ~/.cache."""
    monkeypatch.setenv("QLORA_LIT_CACHE", str(tmp_path_factory.getbasetemp() / "qlora_lit_cache"))


@pytest.fixture(scope="session")
def tokenizer():
    from qlora_lit.data.datamodule import load_tokenizer

    return load_tokenizer(TINY_MODEL)


def shown_by_tensorboard(markdown: str) -> str:
    """The text TensorBoard's TEXT tab displays for a markdown string (its own renderer, then tags stripped)."""
    import html
    import re

    from tensorboard.plugin_util import markdown_to_safe_html

    return html.unescape(re.sub(r"<[^>]+>", "", markdown_to_safe_html(markdown)))
