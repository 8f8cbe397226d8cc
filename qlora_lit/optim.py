"""Optimizer and learning-rate schedule settings, and their construction."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import bitsandbytes as bnb
import torch
from transformers import get_scheduler

from qlora_lit.errors import ConfigError


@dataclass
class OptimizerArgs:
    """AdamW variant and learning-rate schedule."""

    name: Literal["paged_adamw_8bit", "adamw_8bit", "adamw"] = "paged_adamw_8bit"
    """bitsandbytes paged 8-bit AdamW (its state pages to CPU under memory pressure), plain 8-bit, or torch AdamW."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moving-average coefficients."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to `lr`."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up: cosine or linear to 0 at the last step, or constant."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ConfigError(f"optimizer.betas must be in [0, 1), got {self.betas}")


def build_optimizer(params: Iterable[torch.nn.Parameter], args: OptimizerArgs) -> torch.optim.Optimizer:
    optimizer_class = {
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
        "adamw": torch.optim.AdamW,
    }[args.name]
    return optimizer_class(list(params), lr=args.lr, betas=args.betas, weight_decay=args.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, args: OptimizerArgs, total_steps: int):
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[args.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=total_steps)
