"""Prompts to answer rather than to train on: a prompts file, put in the training format (data/prompts.py), left-padded
batches."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from qlora_lit.data.conversations import (
    CONVERSATION_COLUMNS,
    BadRow,
    Conversation,
    parse_messages,
    row_messages,
    with_system,
)
from qlora_lit.data.prompts import DEFAULT_FORMAT, PromptFormat
from qlora_lit.data.sources import read_text
from qlora_lit.errors import ConfigError


def read_prompts_file(path: str | Path, encoding: str = "utf-8") -> list[dict]:
    """Rows of a JSONL file: one JSON object per line with a non-empty "instruction" (and an optional "input"), or a
    conversation to continue (`messages` or ShareGPT `conversations`, ending with the user's turn: the one answered).

    Other keys (a reference "output", an id) are kept, so they come back beside the answers. Blank lines are skipped;
    any other bad line is an error that names the file and the line. The text is read as training data is
    (`sources.read_text`: `encoding`, data.encoding for predict; a byte-order mark), and split at newlines only.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"prompts file {str(path)!r} does not exist")
    rows = []
    # not splitlines(): U+2028 and other line separators may sit inside JSON strings
    for number, line in enumerate(read_text(path, encoding).split("\n"), start=1):
        if line.strip():
            rows.append(_parse_prompt_line(line, f"{path}, line {number}"))
    if not rows:
        raise ConfigError(f"prompts file {str(path)!r} holds no prompts")
    return rows


def _parse_prompt_line(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not valid JSON ({err.msg}): {line[:80]!r}") from None
    if not isinstance(row, dict):
        raise ConfigError(f'{where}: expected a JSON object like {{"instruction": "...", "input": "..."}}')
    if row.get("system") is not None and not isinstance(row["system"], str):
        raise ConfigError(f'{where}: "system" (the row\'s system prompt) must be a string when present')
    if any(key in row for key in CONVERSATION_COLUMNS):
        try:
            if prompt_messages(row):
                return row
        except BadRow as bad:
            raise ConfigError(f"{where}: {bad}") from None
        raise ConfigError(f"{where}: the conversation has no messages")
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ConfigError(f'{where}: needs a non-empty "instruction" string; the keys are {sorted(row)}')
    if row.get("input") is not None and not isinstance(row["input"], str):
        raise ConfigError(f'{where}: "input" must be a string when present')
    return row


def prompt_messages(row: dict, system_prompt: str | None = None) -> Conversation:
    """A prompts-file row as the conversation to answer: its messages, or its instruction (and input) as one user
    turn; its own system prompt (a `system` text, as training rows have), else `system_prompt` (the one training
    used)."""
    own = row.get("system")
    system_prompt = own if own and own.strip() else system_prompt
    column = next((key for key in CONVERSATION_COLUMNS if key in row), None)
    if column is not None:
        return with_system(parse_messages(row[column], answered=False), system_prompt)
    return row_messages(row["instruction"], row.get("input"), system=system_prompt)


def format_prompt(
    tokenizer: PreTrainedTokenizerBase,
    instruction: str,
    input: str | None = None,
    prompt_format: str = DEFAULT_FORMAT,
    system_prompt: str | None = None,
) -> str:
    """The text the model completes, in the format it was trained with (data.prompt_format)."""
    return PromptFormat.named(prompt_format, tokenizer).prompt(row_messages(instruction, input, system=system_prompt))


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    prompt_format: str = DEFAULT_FORMAT,
    system_prompt: str | None = None,
) -> list[list[int]]:
    """Token ids of each row's prompt, as training tokenized it (data.prompt_format's format, data.system_prompt)."""
    conversations = [prompt_messages(row, system_prompt) for row in rows]
    return PromptFormat.named(prompt_format, tokenizer).prompt_ids(conversations)


def left_pad(tokenizer: PreTrainedTokenizerBase, ids: list[list[int]]) -> dict[str, torch.Tensor]:
    """Pad on the left: every prompt then ends at the last column, where generation appends the new tokens."""
    return tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt", padding_side="left")


class PromptCollator:
    """Batches `{"input_ids", "index"}` items into left-padded tensors plus the rows' indices (for the writer)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = left_pad(self.tokenizer, [item["input_ids"] for item in items])
        return {**batch, "index": torch.tensor([item["index"] for item in items])}
