"""The progress bar of a fit: Lightning's rich bar, showing the training metrics without making the host wait."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar


class LoggedMetricsBar(RichProgressBar):
    """Shows `train_loss` (each optimizer step's) and `throughput/tokens_per_s` (each log's), copied from the device
    without waiting for it: the bar shows a value once its copy has arrived, typically during the next micro-batch.

    Lightning turns every metric logged with `prog_bar=True` into a Python number after every training batch, whether
    a bar is shown or not (Lightning-AI/pytorch-lightning#21232): on a GPU, the host waits for the device once per
    micro-batch and cannot queue the next one ahead. qlora_lit logs its training metrics without `prog_bar`, and this
    bar starts one copy to pinned host memory per optimizer step and reads it once a CUDA event says it is done.
    Validation metrics (`val_loss`, logged once per validation) stay Lightning's progress-bar metrics.
    """

    SHOWN = ("train_loss", "throughput/tokens_per_s")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shown: dict[str, float] = {}
        self._copy: HostCopy | None = None
        self._copied_at: int | None = None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if trainer.training:
            if self._copy is not None and self._copy.ready():
                self._shown.update(self._copy.values())
                self._copy = None
            if self._copy is None and trainer.global_step != self._copied_at:
                self._copied_at = trainer.global_step
                logged = trainer.callback_metrics
                shown = {name: logged[name] for name in self.SHOWN if name in logged}
                self._copy = HostCopy(shown) if shown else None
        return {**super().get_metrics(trainer, pl_module), **self._shown}


class HostCopy:
    """Scalar tensors copied to the host without waiting; `ready()` says whether the copy has arrived."""

    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        self.names = list(values)
        device = next(iter(values.values())).device
        stacked = torch.stack([value.detach().float().reshape(()).to(device) for value in values.values()])
        self.done: torch.cuda.Event | None = None
        if device.type == "cuda":
            self.host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            self.host.copy_(stacked, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host = stacked.cpu()

    def ready(self) -> bool:
        return self.done is None or self.done.query()

    def values(self) -> dict[str, float]:
        return dict(zip(self.names, self.host.tolist(), strict=True))
