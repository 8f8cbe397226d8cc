"""Causal-LM loss that computes logits only where there is a label: all at once, or a chunk at a time.

With a 128k vocabulary the logits are the largest activation of a QLoRA step (tokens x vocabulary, upcast to fp32
for the softmax). Prompt and padding positions need no logits at all (about 30% of the tokens of instruction data),
so the head runs on the labelled positions only. Where memory allows, their logits are computed at once and kept
for the backward pass; compiled, the upcast, softmax and target pick of the cross-entropy are one kernel that reads
the bf16 logits once, and its gradient another (eager, each step of it writes a tensor of the logits' size, in fp32).
Short of memory, they are computed in chunks whose logits are recomputed in the backward pass instead of stored,
so memory holds one chunk of logits at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # the label of positions the loss skips (torch's and transformers' cross-entropy default)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `logits` (any float dtype; the softmax runs in fp32) against `targets`."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


@cache
def compiled_cross_entropy_sum() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`cross_entropy_sum` through torch.compile, for any number of positions (one graph, compiled once)."""
    return torch.compile(cross_entropy_sum, dynamic=True)


def _chunk_loss_sum(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, loss: Callable) -> torch.Tensor:
    return loss(head(hidden), targets)


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Where the labelled next-token targets are, as indices into the flattened (batch x (length - 1)) targets. On
    the host before a batch moves to the GPU: found there, their count is the one value the chunked loss needs, and
    the host does not wait for the device to learn it."""
    return (labels[:, 1:] != IGNORE_INDEX).reshape(-1).nonzero().flatten()


def labelled_lm_loss_sum(
    causal_lm: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    chunk_tokens: int = 0,
    positions: torch.Tensor | None = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Sum of next-token cross-entropy over the labelled positions (the caller counts them for the mean).

    Args:
        causal_lm: the Hugging Face causal LM (under peft: `peft_model.get_base_model()`; its decoder layers carry
            the LoRA adapters, so they train as usual).
        batch: `input_ids`, `labels` (-100 = ignored) and whatever else the decoder takes (attention mask,
            position ids).
        chunk_tokens: labelled positions per logits chunk, recomputed in the backward pass; 0: all at once, kept.
        positions: `label_positions(labels)`, computed beforehand on the host; without them they are found here.
        compiled: the cross-entropy through torch.compile (on GPUs).
    """
    inputs = {key: value for key, value in batch.items() if key not in ("labels", "label_positions")}
    hidden = causal_lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    if positions is None:
        positions = label_positions(batch["labels"])
    positions = positions.to(hidden.device, non_blocking=True)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, positions)
    targets = targets.reshape(-1).index_select(0, positions)
    head = causal_lm.get_output_embeddings()
    loss = compiled_cross_entropy_sum() if compiled else cross_entropy_sum
    if not targets.numel():  # no labels (a validation filler): zero, still a function of the adapters
        return hidden.float().sum()
    if not chunk_tokens:
        return loss(head(hidden), targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_loss_sum, hidden[chunk], head, targets[chunk], loss, use_reentrant=False)
    return total
