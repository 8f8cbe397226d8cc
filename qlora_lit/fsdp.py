"""FSDP wrapping for a 4-bit base with LoRA adapters (`configs/fsdp.yaml`).

FSDP flattens the parameters of each wrapped unit into one buffer of one dtype, and a buffer is either trained or
frozen. So: the 4-bit weights are stored in the compute dtype (`quantization.quant_storage`), nothing is upcast to
fp32 (`upcast_to_fp32: false`), every decoder layer is one unit, and every module that holds trainable parameters
of its own (the LoRA A and B matrices) is a unit of its own inside it, so no unit mixes frozen and trained tensors.
"""

from __future__ import annotations

import torch


def _own_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return list(module.parameters(recurse=False))


def qlora_wrap_policy(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP `auto_wrap_policy`: decoder layers, and leaf modules whose parameters all train (LoRA matrices)."""
    if recurse:
        return True
    if type(module).__name__.endswith("DecoderLayer"):
        return True
    own = _own_parameters(module)
    return bool(own) and not list(module.children()) and all(param.requires_grad for param in own)
