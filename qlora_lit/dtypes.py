"""The two ways a dtype is written, and the one mapping between them.

YAML settings use torch's names (`model.quantization.compute_dtype: bfloat16`); the plain commands take the short
flags people type (`generate --dtype bf16`, `export --dtype fp32`).
"""

from __future__ import annotations

from typing import Literal

import torch

DTypeName = Literal["bfloat16", "float16", "float32"]
DTypeFlag = Literal["bf16", "fp16", "fp32"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}
FLAG_NAMES: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def dtype_name(name_or_flag: str) -> str:
    """torch's name of a dtype given either way (`bf16` or `bfloat16` -> `bfloat16`)."""
    return FLAG_NAMES.get(name_or_flag, name_or_flag)


def to_dtype(name_or_flag: str) -> torch.dtype:
    return DTYPES[dtype_name(name_or_flag)]
