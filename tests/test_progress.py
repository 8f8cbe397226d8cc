"""The CLI's progress bar reads the logged metrics only at the optimizer steps the loggers write."""

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

from qlora_lit.progress import QuietRichProgressBar

MICRO_BATCHES, ACCUMULATE, LOG_EVERY = 14, 2, 3


class Regression(L.LightningModule):
    """Logs a loss to the progress bar after every micro-batch, and the optimizer step it belongs to."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.losses: list[tuple[int, float]] = []

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.losses.append((self.trainer.global_step, loss.item()))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(MICRO_BATCHES * 2, 4)), 2)


def reads_during_training(bar: RichProgressBar, monkeypatch) -> tuple[list[tuple[int, float]], Regression]:
    """Fit one epoch with `bar`; (global step, train_loss read) each time Lightning's metrics were read in training."""
    reads: list[tuple[int, float]] = []
    read = RichProgressBar.get_metrics

    def counted(self, trainer, pl_module):
        metrics = read(self, trainer, pl_module)
        if trainer.training:
            reads.append((trainer.global_step, metrics["train_loss"]))
        return metrics

    monkeypatch.setattr(RichProgressBar, "get_metrics", counted)
    module = Regression()
    trainer = L.Trainer(
        max_epochs=1,
        accumulate_grad_batches=ACCUMULATE,
        log_every_n_steps=LOG_EVERY,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    return reads, module


def test_the_stock_bar_reads_after_every_micro_batch(monkeypatch):
    reads, _ = reads_during_training(RichProgressBar(), monkeypatch)
    assert len(reads) >= MICRO_BATCHES


def test_quiet_bar_reads_once_per_logged_optimizer_step_and_shows_that_steps_loss(monkeypatch):
    bar = QuietRichProgressBar()
    reads, module = reads_during_training(bar, monkeypatch)
    steps = MICRO_BATCHES // ACCUMULATE
    assert [step for step, _ in reads] == list(range(0, steps + 1, LOG_EVERY))  # first micro-batch, steps 3 and 6
    # What the bar showed last: the loss of the micro-batch that completed step 6.
    assert reads[-1][1] == [loss for step, loss in module.losses if step == 5][-1]
