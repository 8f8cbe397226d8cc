"""The loss is normalised per label token of the optimizer step: micro-batching does not change the gradient."""

from __future__ import annotations

import lightning as L
import torch
from conftest import SAMPLE_DATA, TINY_MODEL
from lightning.pytorch.callbacks import Callback

from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.model import LoraArgs, QuantizationArgs
from qlora_lit.module import QLoRAModule
from qlora_lit.optim import OptimizerArgs


class GradientCapture(Callback):
    """Keeps the (accumulated, all-reduced) LoRA gradients of the first optimizer step, and as "train_loss" the loss
    it logged: per label token of the step, over its micro-batches and ranks, so it is the same however the step's
    examples were split."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1 and "train_loss" not in self.grads:
            self.grads["train_loss"] = trainer.callback_metrics["train_loss"].detach().clone()


def first_step_gradients(
    batch_size: int, accumulate: int, devices: int = 1, **data_settings
) -> dict[str, torch.Tensor]:
    """The LoRA gradients of the first optimizer step (on rank 0 when `devices` > 1: DDP over gloo)."""
    L.seed_everything(11)
    module = QLoRAModule(
        TINY_MODEL,
        quantization=QuantizationArgs(compute_dtype="float32"),
        lora=LoraArgs(r=4, alpha=8, dropout=0.0),
        optimizer=OptimizerArgs(name="adamw"),
    )
    # a long max_length and no length grouping: examples of very different lengths share a step
    settings = {"path": SAMPLE_DATA, "tokenizer": TINY_MODEL, "max_length": 256, "val_size": 8, "seed": 5}
    data = KoAlpacaDataModule(**{**settings, **data_settings}, batch_size=batch_size)
    capture = GradientCapture()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=1,
        accumulate_grad_batches=accumulate,
        limit_val_batches=0,
        logger=False,
        use_distributed_sampler=False,
        callbacks=[capture],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, data)
    return capture.grads


def test_accumulated_micro_batches_give_the_gradient_of_one_big_batch():
    whole = first_step_gradients(batch_size=8, accumulate=1)
    split = first_step_gradients(batch_size=2, accumulate=4)
    assert whole.keys() == split.keys() and "train_loss" in whole
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-7, msg=name)
