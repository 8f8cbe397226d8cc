"""Packing: several examples in one row, each seeing only itself.

A packed row concatenates examples; its `position_ids` restart at 0 at each example and it has no `attention_mask`.
From restarting positions transformers builds a block-diagonal causal mask (sdpa, eager, flex_attention; checked
by tests/test_packing.py) and flash-attention's varlen kernel takes the sequence starts (the module flattens the
batch into one row for it). Labels are -100 at each example's first token, so no example predicts the next one's
start, and the label tokens are exactly those of the examples unpacked: training optimises the same objective.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qlora_lit.data.collate import label_count, label_ids, padded_width
from qlora_lit.loss import IGNORE_INDEX


def pack_rows(lengths: Sequence[int], pack_length: int) -> list[list[int]]:
    """Group example indices into rows of at most `pack_length` tokens, best-fit decreasing (few, full rows).

    Deterministic (the same lengths give the same rows), so every rank and every resumed run agree on the rows, and
    the batch sampler can shuffle, split and skip rows as it does examples.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row number), sorted: the best fit is the first that is enough
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot < len(free):
            space, row = free.pop(slot)
        else:
            space, row = pack_length, len(rows)
            rows.append([])
        rows[row].append(index)
        bisect.insort(free, (space - lengths[index], row))
    return rows


class PackedDataset(torch.utils.data.Dataset):
    """Packed rows built on access from the examples: `input_ids`, `position_ids` and `labels` of each row.

    Args:
        examples: tokenized examples (`input_ids`, `trained_spans`).
        rows: example indices of each row (`pack_rows`).
        train_on_prompt: also train on prompt tokens (never on an example's first token).
    """

    def __init__(self, examples: list[dict], rows: list[list[int]], train_on_prompt: bool = False) -> None:
        self.examples = examples
        self.rows = rows
        self.train_on_prompt = train_on_prompt

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        row = {"input_ids": [], "position_ids": [], "labels": []}
        for example in (self.examples[i] for i in self.rows[index]):
            ids = example["input_ids"]
            row["input_ids"] += ids
            row["position_ids"] += range(len(ids))
            row["labels"] += [IGNORE_INDEX] + label_ids(example, self.train_on_prompt)[1:]
        return row

    def lengths(self) -> list[int]:
        return [sum(len(self.examples[i]["input_ids"]) for i in row) for row in self.rows]

    def label_counts(self) -> list[int]:
        """Label tokens of each row: the sum over its examples, as if they were not packed."""
        return [sum(label_count(self.examples[i], self.train_on_prompt) for i in row) for row in self.rows]


@dataclass
class PackingCollator:
    """Right-pads packed rows. The padding is a segment of its own (positions from 0, labels -100), so it is never
    attended to by a real token; there is no `attention_mask`, which would switch transformers' packed masks off."""

    pad_id: int
    pad_to_multiple_of: int = 8

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = padded_width(max(len(row["input_ids"]) for row in rows), self.pad_to_multiple_of)
        batch = {
            "input_ids": torch.full((len(rows), width), self.pad_id, dtype=torch.long),
            "position_ids": torch.arange(width).repeat(len(rows), 1),
            "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
        }
        for number, row in enumerate(rows):
            length = len(row["input_ids"])
            for key in ("input_ids", "labels", "position_ids"):
                batch[key][number, :length] = torch.as_tensor(row[key])
            batch["position_ids"][number, length:] -= length
        if "step_label_tokens" in rows[0]:
            batch["step_label_tokens"] = torch.tensor(rows[0]["step_label_tokens"])
        return batch
