"""Batching: pad to the longest example and build labels that train only on what should be learned."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qlora_lit.loss import IGNORE_INDEX


@dataclass
class PaddingCollator:
    """Right-pads `input_ids` and masks labels by position, never by token id (pad may equal EOS).

    Labels are -100 on padding and, unless `train_on_prompt`, on the prompt; the EOS that ends a response stays.
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
            ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
            input_ids[row, :length] = ids
            attention_mask[row, :length] = 1
            first_label = 0 if self.train_on_prompt else example["prompt_length"]
            labels[row, first_label:length] = ids[first_label:]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "step_label_tokens" in examples[0]:
            batch["step_label_tokens"] = torch.tensor(examples[0]["step_label_tokens"])
        return batch


def padded_width(longest: int, multiple: int) -> int:
    """The width a batch whose longest row has `longest` tokens is padded to: the next multiple of `multiple`."""
    return -(-longest // multiple) * multiple


def label_count(example: dict, train_on_prompt: bool = False) -> int:
    """Label tokens the loss sees for one example (the model predicts token t+1 from t, so the first never counts)."""
    first_label = 0 if train_on_prompt else example["prompt_length"]
    return len(example["input_ids"]) - max(first_label, 1)


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
