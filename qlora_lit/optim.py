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


BLOCK = 256
"""bitsandbytes' 8-bit optimizers quantize their state in blocks of this many elements (`init_state`'s absmax)."""


class _GroupedStep:
    """bitsandbytes' 8-bit AdamW step with one update kernel for many tensors, and no host wait after each.

    bitsandbytes updates one tensor at a time, with a kernel launch, host work and `torch.cuda.synchronize()` each.
    LoRA has hundreds of small tensors (448 for r=4 on an 8B Llama; an 8B step took 21.8 ms without the waits on an
    H200, bench/optimizer_step.py). Its update is element-wise, and 8-bit state is quantized in blocks of 256
    elements: on tensors whose sizes are multiples of 256, updating their concatenation is updating each, bit for bit.
    So the state of such tensors is one flat buffer per kind, each tensor's state a view into it (`state_dict` gives
    copies, as bitsandbytes' own), and a step concatenates their gradients and weights, updates them with one kernel
    and copies the weights back. Tensors of 32-bit state (under bitsandbytes' 4096 elements) form a group of their
    own; paged state, sizes off the blocks and per-parameter overrides keep bitsandbytes' update one by one. Only paged
    state, which bitsandbytes prefetches asynchronously, keeps a wait.
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
            together: dict[tuple, list[int]] = {}
            for pindex, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    self.init_state(group, param, gindex, pindex)
                if self._groupable(gindex, pindex, param, state):
                    key = (param.device, param.dtype, param.grad.dtype, state["state1"].dtype, state["step"])
                    together.setdefault(key, []).append(pindex)
                    continue
                self.prefetch_state(param)
                self.update_step(group, param, gindex, pindex)
                if getattr(state["state1"], "is_paged", False):
                    waits = True
                    _synchronize(param)
            for key, indices in together.items():
                if len(indices) == 1:
                    self.update_step(group, group["params"][indices[0]], gindex, indices[0])
                else:
                    self._update_together(group, (gindex, *key[:-1]), indices)
        if waits:
            _synchronize(param)
        return loss

    def _groupable(self, gindex: int, pindex: int, param: torch.Tensor, state: dict) -> bool:
        state1 = state["state1"]
        return not (
            getattr(state1, "is_paged", False)
            or (state1.dtype == torch.uint8 and param.numel() % BLOCK)
            or (gindex, pindex) in self.mng.index2config
            or id(param) in self.mng.pid2config
            or "unorm_vec" in state
        )

    def _update_together(self, group: dict, bucket: tuple, indices: list[int]) -> None:
        """One update of the tensors `indices` of `group`, whose state is of one kind, device and step (`bucket`: the
        group's index, then the kind): bitsandbytes' own `update_step` on their concatenation and the flat state."""
        params = [group["params"][i] for i in indices]
        states = [self.state[p] for p in params]
        flat = self._flat_state(bucket, states)
        weights = torch.cat([p.reshape(-1) for p in params])
        weights.grad = torch.cat([p.grad.reshape(-1) for p in params])
        flat["step"] = states[0]["step"]
        self.state[weights] = flat  # for the one call: update_step reads the state of the tensor it updates
        try:
            self.update_step(group, weights, bucket[0], indices[0])
        finally:
            del self.state[weights]
        for state in states:
            state["step"] += 1
        pieces = weights.split([p.numel() for p in params])
        torch._foreach_copy_(params, [piece.view_as(p) for piece, p in zip(pieces, params, strict=True)])

    def _flat_state(self, bucket: tuple, states: list[dict]) -> dict:
        """The bucket's state, one flat buffer per tensor of state, made once, and again when its tensors change (a
        tensor without a gradient in a step) or a resume replaced the per-tensor state. One per bucket: a replaced
        buffer is freed with its views."""
        flats = self.__dict__.setdefault("_flats", {})
        views, flat = flats.get(bucket, ([], None))
        if len(views) == len(states) and all(s["state1"] is v for s, v in zip(states, views, strict=True)):
            return flat
        flat = {key: value for key, value in states[0].items() if key.startswith("qmap")}  # shared, not per tensor
        for name in ["state1", "state2", "absmax1", "absmax2"] if "absmax1" in states[0] else ["state1", "state2"]:
            flat[name] = torch.cat([s[name].reshape(-1) for s in states])
            for state, view in zip(states, flat[name].split([s[name].numel() for s in states]), strict=True):
                state[name] = view.view_as(state[name])
        flats[bucket] = ([s["state1"] for s in states], flat)
        return flat

    def state_dict(self):
        """bitsandbytes' state dict, with each tensor's state its own copy: saved one by one (sharded checkpoints),
        a view would carry the whole flat buffer."""
        state_dict = super().state_dict()
        for entry in state_dict["state"].values():
            _copy_views(entry)
        return state_dict


def _copy_views(entry: dict) -> None:
    for key, value in entry.items():
        if isinstance(value, dict):
            _copy_views(value)
        elif isinstance(value, torch.Tensor) and value._base is not None:
            entry[key] = value.clone()


def _synchronize(param: torch.Tensor) -> None:
    if param.device.type == "cuda":
        torch.cuda.synchronize(param.device)


class PagedAdamW8bit(_GroupedStep, bnb.optim.PagedAdamW8bit):
    """bitsandbytes' paged 8-bit AdamW, tensors of unpaged state updated together (`_GroupedStep`)."""


class AdamW8bit(_GroupedStep, bnb.optim.AdamW8bit):
    """bitsandbytes' 8-bit AdamW, its tensors updated together (`_GroupedStep`)."""


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
