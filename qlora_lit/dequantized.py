"""`model.keep_dequantized`: the frozen 4-bit weights dequantized once and kept in the compute dtype.

QLoRA dequantizes every NF4 weight twice per micro-batch (forward, and backward for the input's gradient), and each
time it is the same tensor: the base never changes. Keeping it dequantized computes the same products (bitsandbytes'
training path is dequantize, then `F.linear`, for micro-batches above 1,536 tokens, and the backward always is) and
saves those kernels, for the memory of the weights in bf16 instead of 4 bits (about +10 GiB at 8B: the 4-bit copy is
freed). docs/PERFORMANCE.md priced it at +19% of forward + backward at 8B on an H200. The adapters, the checkpoints
and the exported model are unchanged: they hold LoRA weights only, and export loads the base again.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from torch import nn


class DequantizedLinear(nn.Linear):
    """A frozen `bnb.nn.Linear4bit` with its weight dequantized, computing as the 4-bit layer does: the input cast to
    the compute dtype, the result cast back to the input's dtype. An `nn.Linear`, as the 4-bit layer is, so what counts
    linear layers (the FLOPs of qlora_lit/flops.py) counts it."""

    def __init__(self, layer: bnb.nn.Linear4bit) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate and initialise a weight of its own
        dtype = layer.compute_dtype or torch.float32
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight = nn.Parameter(weight, requires_grad=False)
        bias = None if layer.bias is None else nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
        self.register_parameter("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}"


def four_bit_layers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Where each 4-bit linear layer of `model` is: its parent module and its name there (not the layer itself, so a
    replaced layer is freed at once)."""
    return [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, bnb.nn.Linear4bit)
    ]


def extra_bytes(model: nn.Module) -> int:
    """What keeping the 4-bit weights dequantized adds to the model's memory: each weight in its compute dtype, less
    its packed 4-bit data (the quantization constants are small beside it)."""
    total = 0
    for parent, name in four_bit_layers(model):
        layer = getattr(parent, name)
        itemsize = (layer.compute_dtype or torch.float32).itemsize
        total += layer.in_features * layer.out_features * itemsize - layer.weight.data.nbytes
    return total


def replace_four_bit_layers(model: nn.Module) -> int:
    """Replace every 4-bit linear layer of `model` with its `DequantizedLinear`, one at a time (each 4-bit layer is
    freed as its replacement takes its place); returns how many were replaced."""
    places = four_bit_layers(model)
    for parent, name in places:
        setattr(parent, name, DequantizedLinear(getattr(parent, name)))
    return len(places)
