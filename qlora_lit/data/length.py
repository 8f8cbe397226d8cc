"""The `max_length` policy: training examples of at most `max_length` tokens from the cached conversations.

`overlong: truncate` (the default): a longer conversation of several turns keeps its system prompt and its last
turns, whole earlier turns left out until it fits (rendered again through the prompt format, so the shortened
conversation reads as if it had begun there); no answer is cut while dropping turns can make it fit. One that is
still too long with its last turn alone is cut at `max_length`, and its answer loses its end of turn (the model must
not learn to stop there). `overlong: drop` leaves every longer row out. Either way a row whose prompt alone fills
`max_length` is dropped: nothing of its answer would be trained.
"""

from __future__ import annotations

from qlora_lit.data.conversations import drop_earlier_turns, from_json
from qlora_lit.data.prompts import PromptFormat, Tokens
from qlora_lit.data.token_cache import CachedRow

LENGTH_COUNTS = (
    "overlong",
    "turns_dropped_rows",
    "turns_dropped",
    "truncated",
    "overlong_dropped",
    "prompt_too_long_dropped",
)


def fit_to_length(
    rows: list[CachedRow], max_length: int, overlong: str, prompt_format: PromptFormat
) -> tuple[list[tuple[int, dict]], dict[str, int]]:
    """(source, example) of every row that is kept, and counts of what happened to the longer ones: `overlong` rows,
    `turns_dropped_rows` shortened by `turns_dropped` earlier turns in all, `truncated` (cut), `overlong_dropped`,
    `prompt_too_long_dropped`."""
    examples = []
    counts = dict.fromkeys(LENGTH_COUNTS, 0)
    for row in rows:
        tokens = row.tokens
        if len(tokens.ids) > max_length:
            counts["overlong"] += 1
            if overlong == "truncate":
                tokens, dropped = without_earlier_turns(row, max_length, prompt_format)
                counts["turns_dropped_rows"] += dropped > 0
                counts["turns_dropped"] += dropped
            if prompt_fills(tokens, max_length):
                counts["prompt_too_long_dropped"] += 1
                continue
            if overlong == "drop":
                counts["overlong_dropped"] += 1
                continue
            counts["truncated"] += len(tokens.ids) > max_length
        examples.append((row.source, cut(tokens, max_length)))
    return examples, counts


def without_earlier_turns(row: CachedRow, max_length: int, prompt_format: PromptFormat) -> tuple[Tokens, int]:
    """The row with as few of its earliest turns left out as make it fit (all but the last when none do), and how
    many were left out."""
    if row.turns < 2:
        return row.tokens, 0
    conversation = from_json(row.messages)
    shorter = range(row.turns - 1, 0, -1)  # turns kept, the most first
    encoded = prompt_format.encode([drop_earlier_turns(conversation, kept) for kept in shorter])
    for kept, tokens in zip(shorter, encoded, strict=True):
        if len(tokens.ids) <= max_length:
            return tokens, row.turns - kept
    return encoded[-1], row.turns - 1


def prompt_fills(tokens: Tokens, max_length: int) -> bool:
    """Whether no trained position lies within the first `max_length` tokens."""
    return not tokens.trained or tokens.trained[0][0] >= max_length


def cut(tokens: Tokens, max_length: int) -> dict:
    """A training example: the first `max_length` ids and the trained spans within them."""
    spans = [(start, min(end, max_length)) for start, end in tokens.trained if start < max_length]
    return {"input_ids": tokens.ids[:max_length], "trained_spans": spans}
