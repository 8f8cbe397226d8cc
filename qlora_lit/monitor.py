"""Speed and health of training as TensorBoard scalars: throughput, MFU, padding, gradient norm, GPU memory."""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from qlora_lit.flops import LoraFlops, peak_tflops
from qlora_lit.loss import IGNORE_INDEX


class TrainingMonitor(Callback):
    """Logs every `trainer.log_every_n_steps` optimizer steps, over the steps since the last log and all ranks:

    - `throughput/tokens_per_s`: real (non-padding) tokens per second (also in qlora_lit's progress bar).
    - `throughput/label_tokens_per_s`: tokens the loss is computed on, per second.
    - `throughput/samples_per_s`: examples per second.
    - `throughput/step_time_s`: seconds per optimizer step.
    - `throughput/mfu`: model FLOPs utilisation (see qlora_lit.flops), when the device's peak is known.
    - `train/padding_fraction`: share of the batches' token slots that are padding.
    - `train/grad_norm`: L2 norm of the trained parameters' gradient at the logged step, before clipping (with DDP
      the all-reduced gradient; under FSDP too, whose ranks hold the adapters whole).
    - `memory/peak_allocated_gib`, `memory/peak_reserved_gib`: CUDA allocator peaks since the last log, the
      largest rank's (CUDA only).

    The clock runs from log to log and stops during validation. The device is synchronized only where it is read,
    at the logged steps (where logging synchronizes anyway), so training is not slowed down step by step.

    Args:
        peak_tflops: the device's dense bf16 peak in TFLOP/s, for MFU. By default it is looked up by the CUDA
            device's name (qlora_lit.flops.PEAK_BF16_TFLOPS); set it for devices not listed (also makes a CPU
            report MFU).
    """

    def __init__(self, peak_tflops: float | None = None) -> None:
        self.peak_tflops = peak_tflops
        self._clock: float | None = None  # start of the running time segment; None while paused
        self._first_step_from: float | None = None
        self._grad_norm: torch.Tensor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_step_from = _synchronized_time(pl_module.device)
        self._flops = LoraFlops.of(pl_module.model)
        self._peak = self.peak_tflops
        if self._peak is None and pl_module.device.type == "cuda":
            self._peak = peak_tflops(torch.cuda.get_device_name(pl_module.device))
        self._last_step = trainer.global_step
        self._start_window(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int):
        if self._clock is None:
            self._clock = _synchronized_time(pl_module.device)
        lengths = example_lengths(batch)
        labels = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # the model predicts token t+1 from t
        # Device tensors, added up without waiting for the device; read once per log.
        pairs = (lengths * (lengths + 1) // 2).sum()
        self._counts += torch.stack([lengths.sum(), labels, pairs, (lengths > 0).sum()])  # examples, not packed rows
        self._slots += batch["input_ids"].numel()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        # Lightning calls this after backward (gradients all-reduced, unscaled) and before it clips them.
        if self._logs_at(trainer, trainer.global_step + 1):
            grads = [param.grad for param in pl_module.parameters() if param.grad is not None]
            self._grad_norm = torch.nn.utils.get_total_norm(grads).to(pl_module.device)  # empty: a CPU zero

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int):
        if trainer.global_step == self._last_step:
            return  # accumulating gradients: no optimizer step yet
        self._steps += trainer.global_step - self._last_step
        self._last_step = trainer.global_step
        if self._first_step_from is not None:
            seconds = _synchronized_time(pl_module.device) - self._first_step_from
            compiled = " (compiling the decoder layers included)" if getattr(pl_module, "compile_layers", False) else ""
            rank_zero_info(f"first optimizer step: {seconds:.1f} s{compiled}")
            self._first_step_from = None
        if self._logs_at(trainer, trainer.global_step):
            metrics = self._window_metrics(trainer, pl_module)
            pl_module.log_dict(metrics)  # not prog_bar: Lightning would read it after every micro-batch (progress.py)
            self._start_window(pl_module.device)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._clock is not None:
            self._elapsed += _synchronized_time(pl_module.device) - self._clock
            self._clock = None  # restarts with the next training batch

    @staticmethod
    def _logs_at(trainer: L.Trainer, step: int) -> bool:
        """Whether Lightning writes the logs after optimizer step `step` (as its logger connector decides)."""
        return trainer.log_every_n_steps > 0 and step % trainer.log_every_n_steps == 0

    def _start_window(self, device: torch.device) -> None:
        # real tokens, label tokens, causal pairs, examples
        self._counts = torch.zeros(4, dtype=torch.long, device=device)
        self._slots = self._steps = 0
        self._elapsed = 0.0
        self._grad_norm = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self._clock = _synchronized_time(device)

    def _window_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        device = pl_module.device
        seconds = self._elapsed + _synchronized_time(device) - self._clock
        memory = [0, 0]
        if device.type == "cuda":
            memory = [torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)]
        local = [self._slots, seconds, *memory]
        stats = torch.cat([self._counts.double(), torch.tensor(local, dtype=torch.float64, device=device)])
        ranks = pl_module.all_gather(stats).reshape(-1, stats.numel())
        tokens, labels, pairs, samples, slots = ranks[:, :5].sum(dim=0).tolist()
        seconds, allocated, reserved = ranks[:, 5:].max(dim=0).values.tolist()  # the slowest rank sets the pace
        metrics = {
            "throughput/tokens_per_s": tokens / seconds,
            "throughput/label_tokens_per_s": labels / seconds,
            "throughput/samples_per_s": samples / seconds,
            "throughput/step_time_s": seconds / self._steps,
            "train/padding_fraction": 1.0 - tokens / slots,
        }
        if self._grad_norm is not None:
            metrics["train/grad_norm"] = self._grad_norm.item()
        if self._peak:
            achieved = self._flops.total(tokens, pairs) / seconds
            metrics["throughput/mfu"] = achieved / (self._peak * 1e12 * trainer.world_size)
        if device.type == "cuda":
            metrics["memory/peak_allocated_gib"] = allocated / 2**30
            metrics["memory/peak_reserved_gib"] = reserved / 2**30
        return metrics


def _synchronized_time(device: torch.device) -> float:
    """Wall-clock seconds once the device has finished the work queued so far (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def example_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Real (non-padding) length of every example in a padded or packed batch, flattened; for packed rows, zeros stand
    in the slots of their padding and of unused segments (they add nothing to sums of lengths or of causal pairs).

    Padded rows carry an `attention_mask`. Packed rows carry `position_ids` restarting at 0 per example; their
    padding is the trailing segment, the only one without a single label. It runs before every micro-batch, so it
    uses no operation whose output size depends on the data (bincount, boolean indexing): on a GPU those make the
    host wait for the device.
    """
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(dim=1)
    segment = (batch["position_ids"] == 0).cumsum(dim=1) - 1  # segment number of every position in its row
    rows, width = segment.shape
    flat = (segment + torch.arange(rows, device=segment.device)[:, None] * width).flatten()
    slots = torch.zeros(rows * width, dtype=torch.long, device=flat.device)
    lengths = slots.scatter_add(0, flat, torch.ones_like(flat))
    labelled = slots.scatter_add(0, flat, (batch["labels"] != IGNORE_INDEX).flatten().long())
    return torch.where(labelled > 0, lengths, 0)
