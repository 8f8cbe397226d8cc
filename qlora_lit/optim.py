"""Optimizer and learning-rate schedule settings, and their construction."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import bitsandbytes as bnb
import torch
from lightning.pytorch.utilities import rank_zero_warn
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
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"optimizer.lr must be a positive number, got {self.lr}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay must be a number >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ConfigError(f"optimizer.betas must be in [0, 1), got {self.betas}")


class _StepWithoutWaiting:
    """bitsandbytes' 8-bit AdamW step, waiting for the GPU only where its paged memory needs it.

    bitsandbytes' `step` calls `torch.cuda.synchronize()` after every tensor's update. LoRA has hundreds of small
    tensors (448 for r=4 on an 8B Llama): on an H200 the paged step took 25.3 ms with the waits and 21.8 ms without
    (bench/optimizer_step.py; docs/PERFORMANCE.md). The updates need no waiting: they run in order on one stream.
    Only state in paged (unified) memory, which bitsandbytes prefetches asynchronously and allocates for tensors of
    100k elements or more, keeps its wait. Same kernels, same order, bit-identical results.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:  # bitsandbytes' own first-step setup
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        waits = False
        for gindex, group in enumerate(self.param_groups):
            for pindex, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                if not self.state[param]:
                    self.init_state(group, param, gindex, pindex)
                self.prefetch_state(param)
                self.update_step(group, param, gindex, pindex)
                if getattr(self.state[param]["state1"], "is_paged", False):
                    waits = True
                    _synchronize(param)
        if waits:
            _synchronize(param)
        return loss


def _synchronize(param: torch.Tensor) -> None:
    if param.device.type == "cuda":
        torch.cuda.synchronize(param.device)


class PagedAdamW8bit(_StepWithoutWaiting, bnb.optim.PagedAdamW8bit):
    """bitsandbytes' paged 8-bit AdamW without a host wait per tensor."""


class AdamW8bit(_StepWithoutWaiting, bnb.optim.AdamW8bit):
    """bitsandbytes' 8-bit AdamW without a host wait per tensor."""


def build_optimizer(params: Iterable[torch.nn.Parameter], args: OptimizerArgs) -> torch.optim.Optimizer:
    optimizer_class = {
        "paged_adamw_8bit": PagedAdamW8bit,
        "adamw_8bit": AdamW8bit,
        "adamw": torch.optim.AdamW,
    }[args.name]
    return optimizer_class(list(params), lr=args.lr, betas=args.betas, weight_decay=args.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, args: OptimizerArgs, total_steps: int):
    if args.warmup_steps >= total_steps:
        rank_zero_warn(
            f"optimizer.warmup_steps={args.warmup_steps} is not shorter than the run's {total_steps} optimizer steps: "
            "the learning rate never reaches optimizer.lr"
        )
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[args.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=total_steps)


def apply_optimizer_settings(trainer, args: OptimizerArgs) -> None:
    """After a resume restored the optimizer and scheduler states, continue with the settings the user gave now:
    their learning rate (through the schedule built from today's settings, at the restored step), weight decay and
    betas. The restored states carry the checkpoint's, so a lower `optimizer.lr` after a NaN loss would do nothing.
    With unchanged settings this sets exactly the values that were restored."""
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        scheduler.base_lrs = [args.lr] * len(scheduler.base_lrs)
        for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group["initial_lr"] = args.lr
            group["lr"] = args.lr * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group["weight_decay"], group["betas"] = args.weight_decay, tuple(args.betas)
