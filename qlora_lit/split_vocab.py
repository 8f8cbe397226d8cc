"""The output head and the input embeddings split by vocabulary rows, for FSDP: no rank gathers either whole.

FSDP gathers a unit whole to compute with it. An untied output head is one matrix of vocabulary x hidden in bf16:
2 GiB at Llama-3.1-70B (128,256 x 8,192), five of its 4-bit decoder layers, gathered at the end of every forward pass,
when the step's activations are held; the input embeddings are as large, gathered at its start (and, with their
output made to need a gradient for checkpointing, again at the end of the backward pass). Split into pieces of
about a decoder layer's size, each an FSDP unit of its own, they compute a piece at a time and a rank holds at most
one piece unsharded. The results are the same: a logit is the dot product of one head row with the hidden state, and
an embedding is one row, copied from whichever piece holds it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qlora_lit.model import causal_lm, decoder_layers
from qlora_lit.sharded_load import base_bytes


def tied(embeddings: nn.Module, head: nn.Module) -> bool:
    """The output head and the input embeddings are one tensor (split ones, which have no `weight`, are not)."""
    weight = getattr(head, "weight", None)
    return weight is not None and weight is getattr(embeddings, "weight", None)


def row_bounds(rows: int, pieces: int) -> list[tuple[int, int]]:
    bounds = [round(i * rows / pieces) for i in range(pieces + 1)]
    return list(zip(bounds, bounds[1:], strict=False))


class SplitHead(nn.Module):
    """A frozen linear head as `pieces` linear layers over consecutive vocabulary rows; the output is theirs joined.
    Built empty (meta device): `ShardedLoader` fills each piece from its rows of the checkpoint's head
    (`vocab_rows`)."""

    def __init__(self, head: nn.Linear, pieces: int) -> None:
        super().__init__()
        self.in_features, self.out_features = head.in_features, head.out_features
        self.pieces = nn.ModuleList()
        for start, end in row_bounds(head.out_features, pieces):
            piece = nn.Linear(head.in_features, end - start, bias=head.bias is not None, device="meta")
            piece.to(head.weight.dtype).requires_grad_(False)
            piece.vocab_rows = (start, end)  # where its rows are in the whole head
            self.pieces.append(piece)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([piece(hidden) for piece in self.pieces], dim=-1)


class SplitEmbedding(nn.Module):
    """Frozen input embeddings as `pieces` embeddings of consecutive vocabulary rows: each token's vector comes from
    the piece that holds its row, with no host synchronisation (every piece looks up every token, and the tokens
    outside its rows are discarded). Token ids must be below the vocabulary size (`preflight.check_vocabulary`);
    one that is not gets zeros instead of an indexing error. Built empty, filled by `ShardedLoader`."""

    def __init__(self, embeddings: nn.Embedding, pieces: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embeddings.num_embeddings, embeddings.embedding_dim
        self.pieces = nn.ModuleList()
        for start, end in row_bounds(embeddings.num_embeddings, pieces):
            piece = nn.Embedding(end - start, embeddings.embedding_dim, device="meta", dtype=embeddings.weight.dtype)
            piece.requires_grad_(False)
            piece.vocab_rows = (start, end)
            self.pieces.append(piece)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vectors = None
        for piece in self.pieces:
            start, end = piece.vocab_rows
            inside = (ids >= start) & (ids < end)
            found = piece(torch.where(inside, ids - start, 0))
            vectors = torch.where(inside.unsqueeze(-1), found, 0 if vectors is None else vectors)
        return vectors


def pieces_for(model: nn.Module, weight: torch.Tensor) -> int:
    """How many pieces of its largest decoder layer's size a weight takes; 1 where it is no larger (or no layer)."""
    layer_bytes = max(map(base_bytes, decoder_layers(model)), default=0)
    weight_bytes = weight.numel() * weight.element_size()
    return math.ceil(weight_bytes / layer_bytes) if layer_bytes and weight_bytes > layer_bytes else 1


def split_output_head(model: nn.Module) -> SplitHead | None:
    """Replace the (still empty) model's untied linear output head with a `SplitHead` of pieces no larger than its
    largest decoder layer (`model`: the base or the PEFT model); None where the head stays as it is: tied to the
    embeddings (one tensor with them), not a plain linear layer (LoRA on it, a custom head), already loaded, or no
    larger than a layer."""
    base = causal_lm(model)
    head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    if type(head) is not nn.Linear or not head.weight.is_meta or embeddings is None or tied(embeddings, head):
        return None  # (a loaded head is kept: the pieces are filled by ShardedLoader, which loads empty models)
    pieces = pieces_for(base, head.weight)
    if pieces == 1:
        return None
    split = SplitHead(head, pieces)
    base.set_output_embeddings(split)
    return split if base.get_output_embeddings() is split else None


def split_input_embeddings(model: nn.Module) -> SplitEmbedding | None:
    """Replace the (still empty) model's untied input embeddings with a `SplitEmbedding` of pieces no larger than its
    largest decoder layer, keeping their forward hooks (peft's and transformers' hook that makes the output need a
    gradient for checkpointing); None where they stay: tied to the head, not a plain `nn.Embedding` (Gemma's scaled
    embeddings, LoRA on them), already loaded, or no larger than a layer."""
    base = causal_lm(model)
    embeddings, head = base.get_input_embeddings(), base.get_output_embeddings()
    plain = type(embeddings) is nn.Embedding and embeddings.max_norm is None and embeddings.weight.is_meta
    if not plain or tied(embeddings, head):
        return None
    pieces = pieces_for(base, embeddings.weight)
    if pieces == 1:
        return None
    split = SplitEmbedding(embeddings, pieces)
    split._forward_hooks.update(embeddings._forward_hooks)
    base.set_input_embeddings(split)
    return split if base.get_input_embeddings() is split else None
