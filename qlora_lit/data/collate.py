"""Batching: pad to the longest example and build labels that train only on what should be learned."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qlora_lit.loss import IGNORE_INDEX


@dataclass
class PaddingCollator:
    """Right-pads `input_ids` and masks labels by position, never by token id (pad may equal EOS).

    Labels are -100 on padding and, unless `train_on_prompt`, outside the example's trained spans (its answers and
    their ends of turn: the EOS that ends an answer stays).
    """

    pad_id: int
    train_on_prompt: bool = False
    pad_to_multiple_of: int = 8

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(example["input_ids"]) for example in examples]
        width = padded_width(max(lengths), self.pad_to_multiple_of)
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for row, (example, length) in enumerate(zip(examples, lengths, strict=True)):
            input_ids[row, :length] = torch.as_tensor(example["input_ids"], dtype=torch.long)
            attention_mask[row, :length] = 1
            labels[row, :length] = torch.as_tensor(label_ids(example, self.train_on_prompt), dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "step_label_tokens" in examples[0]:
            batch["step_label_tokens"] = torch.tensor(examples[0]["step_label_tokens"])
        return batch


def padded_width(longest: int, multiple: int) -> int:
    """The width a batch whose longest row has `longest` tokens is padded to: the next multiple of `multiple`."""
    return -(-longest // multiple) * multiple


def label_ids(example: dict, train_on_prompt: bool = False) -> list[int]:
    """An example's labels: its ids in its trained spans (everywhere with `train_on_prompt`), IGNORE_INDEX elsewhere."""
    ids = example["input_ids"]
    if example.get("filler"):  # a copy that evens out the ranks' validation shares (data/datamodule.py): no loss
        return [IGNORE_INDEX] * len(ids)
    if train_on_prompt:
        return list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in example["trained_spans"]:
        labels[start:end] = ids[start:end]
    return labels


def label_count(example: dict, train_on_prompt: bool = False) -> int:
    """Label tokens the loss sees for one example (the model predicts token t+1 from t, so the first never counts)."""
    if train_on_prompt:
        return len(example["input_ids"]) - 1
    return sum(max(0, end - max(start, 1)) for start, end in example["trained_spans"])


class StepTaggedDataset(torch.utils.data.Dataset):
    """Looks items (examples or packed rows) up by `(index, step_label_tokens)` keys from EpochBatchSampler and
    attaches the count."""

    def __init__(self, examples: Sequence[dict]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, step_label_tokens = key
        return {**self.examples[index], "step_label_tokens": step_label_tokens}
