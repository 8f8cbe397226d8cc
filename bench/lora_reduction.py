"""LoRA's down-projection A as a reduction instead of a matrix product (an experiment of issue 20, the `*-lorared`
variants of bench/run_qlora_lit.py).

`lora_A(dropout(x))` is a product with only r (4) output columns: the 8B profile of call f spent about 8% of the GPU's
time in such skinny products (cutlass tiles of 64 columns for 4), and the dropout before each writes a masked copy
of the input that the product then reads. Written as `(x[..., None, :] * A).sum(-1)`, Inductor can fuse the dropout,
the products and the sums into one reduction kernel that reads the input once. The arithmetic is the product's
(operands in the autocast dtype, sums in fp32); only the order of the additions may differ. For compiled layers
only: run eagerly, it materialises every product (tokens x r x inputs in fp32: 940 MB for `down_proj` at 8B).
"""

from __future__ import annotations

import lightning as L
import torch
from peft.tuners.lora import LoraLayer
from torch import nn


class ReductionLinear(nn.Linear):
    """An nn.Linear without bias whose product is computed as an elementwise product and a sum."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        products = x.to(dtype).unsqueeze(-2).float() * self.weight.to(dtype).float()
        return products.sum(-1).to(dtype)


def reduce_lora_a(model: nn.Module) -> int:
    """Turn every LoRA A matrix of `model` into a ReductionLinear (same parameters, same names); how many."""
    count = 0
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for lora_a in layer.lora_A.values():
                if type(lora_a) is nn.Linear and lora_a.bias is None:
                    lora_a.__class__ = ReductionLinear
                    count += 1
    return count


class LoraAReduction(L.Callback):
    """Applies reduce_lora_a once the model is built, before the layers are compiled (the first forward)."""

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        reduce_lora_a(module.model)
