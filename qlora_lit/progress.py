"""The CLI's progress bar: Lightning's rich bar, with the training metrics read only when the loggers write them."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class QuietRichProgressBar(RichProgressBar):
    """Lightning's `RichProgressBar` reads the progress-bar metrics after every micro-batch, whatever its refresh
    rate; each read turns the logged device tensors into numbers, and on a GPU every such read waits until all queued
    work is done, so the host cannot queue the next micro-batch ahead. This bar reads them once per optimizer step
    that the loggers write (every `trainer.log_every_n_steps`, as HF's Trainer shows its loss at `logging_steps`), and
    whenever training is not running (validation, the epoch's end); in between it shows the last values read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shown: dict[str, Any] = {}
        self._shown_at_step: int | None = None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        step, every = trainer.global_step, trainer.log_every_n_steps
        not_due = step == self._shown_at_step or (every > 0 and step % every != 0)
        if trainer.training and self._shown_at_step is not None and not_due:
            return self._shown
        self._shown, self._shown_at_step = super().get_metrics(trainer, pl_module), step
        return self._shown
