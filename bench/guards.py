"""Skipping dynamo's guard checks once the layers are compiled (an experiment of issue 20, the `*-noguards` variants
of bench/run_qlora_lit.py): the 2026-11-29 profile measured about 0.4 ms of host time per compiled layer call in
them, on micro-batches whose time the host's work bounds.

`torch.compiler.set_stance(skip_guard_eval_unsafe=True)` keeps only the checks that tell the compiled graphs apart
(here: whether the layer's input needs a gradient, layer 0's does not); it is safe only when no new graph will be
needed, which holds once the first optimizer steps have compiled both (shapes are dynamic).
"""

from __future__ import annotations

import lightning as L
import torch


class SkipGuardsAfter(L.Callback):
    """From optimizer step `step` on, dynamo checks only the guards that choose between compiled graphs."""

    def __init__(self, step: int = 2) -> None:
        self.step = step
        self.skipping = False

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if not self.skipping and trainer.global_step >= self.step:
            torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
            self.skipping = True

    def on_fit_end(self, *args) -> None:
        if self.skipping:
            torch.compiler.set_stance("default")
