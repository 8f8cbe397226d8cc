"""The output head split by vocabulary rows, for FSDP: no rank gathers all of it at once.

FSDP gathers a unit whole to compute with it. An untied output head is one matrix of vocabulary x hidden in bf16:
2 GiB at Llama-3.1-70B (128,256 x 8,192), five of its 4-bit decoder layers, gathered at the end of every forward pass,
when the step's activations are held. Split into pieces of about a decoder layer's size, each an FSDP unit of its
own, the logits are computed a piece at a time (each piece's rows give their slice of the vocabulary) and a rank
holds at most one piece unsharded. The logits are the same: each is the dot product of one row with the hidden state.
(The input embeddings, as large, are still gathered whole, at the start of the forward pass.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qlora_lit.model import decoder_layers
from qlora_lit.sharded_load import base_bytes, causal_lm


class SplitHead(nn.Module):
    """A frozen linear head as `pieces` linear layers over consecutive vocabulary rows; the output is theirs joined.
    Built empty (meta device): `ShardedLoader` fills each piece from the rows of the checkpoint's head (`head_rows`)."""

    def __init__(self, head: nn.Linear, pieces: int) -> None:
        super().__init__()
        self.in_features, self.out_features = head.in_features, head.out_features
        bounds = [round(i * head.out_features / pieces) for i in range(pieces + 1)]
        self.pieces = nn.ModuleList()
        for start, end in zip(bounds, bounds[1:], strict=False):
            piece = nn.Linear(head.in_features, end - start, bias=head.bias is not None, device="meta")
            piece.to(head.weight.dtype).requires_grad_(False)
            piece.head_rows = (start, end)  # where its rows are in the whole head
            self.pieces.append(piece)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([piece(hidden) for piece in self.pieces], dim=-1)


def split_output_head(model: nn.Module) -> SplitHead | None:
    """Replace the (still empty) model's untied linear output head with a `SplitHead` of pieces no larger than its
    largest decoder layer (`model`: the base or the PEFT model); None where the head stays as it is: tied to the
    embeddings (one tensor with them), not a plain linear layer (LoRA on it, a custom head), already loaded, no
    larger than a layer, or no decoder layer found to size the pieces by."""
    base = causal_lm(model)
    head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    if type(head) is not nn.Linear or not head.weight.is_meta or embeddings is None or head.weight is embeddings.weight:
        return None  # (a loaded head is kept: the pieces are filled by ShardedLoader, which loads empty models)
    layer_bytes = max(map(base_bytes, decoder_layers(base)), default=0)
    head_bytes = head.weight.numel() * head.weight.element_size()
    if not layer_bytes or head_bytes <= layer_bytes:
        return None
    split = SplitHead(head, math.ceil(head_bytes / layer_bytes))
    base.set_output_embeddings(split)
    return split if base.get_output_embeddings() is split else None
