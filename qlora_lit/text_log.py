"""Text in TensorBoard (its TEXT tab renders markdown): the run's resolved configuration, logged once."""

from __future__ import annotations

import re

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger


def log_text(trainer: L.Trainer, tag: str, markdown: str, step: int) -> None:
    """Write markdown text to every TensorBoard logger of the trainer (call it on rank 0 only)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(tag, markdown, global_step=step)


# Everything but letters, digits and spaces (underscore included) may be markdown syntax.
MARKDOWN_SIGNIFICANT = re.compile(r"[^\w\s]|_")


def as_prose(text: str) -> str:
    """Markdown that shows `text` as it is, wrapped like a paragraph, with its line breaks.

    Punctuation becomes numeric character references, which markdown never reads as syntax (a generated "1." or "#"
    or "===" would otherwise turn into a list or a heading); leading spaces go, as they would start a code block.
    """
    lines = [MARKDOWN_SIGNIFICANT.sub(lambda m: f"&#{ord(m.group())};", line.strip()) for line in text.splitlines()]
    return "  \n".join(lines).strip() or "(empty)"


def verbatim(text: str) -> str:
    """A markdown code block showing `text` as it is (indented, so backticks or '#' inside cannot break out)."""
    return "\n".join("    " + line for line in text.splitlines()) or "    (empty)"


class SaveAndLogConfig(SaveConfigCallback):
    """Lightning's config.yaml in the log directory, plus the same resolved config as TensorBoard text `config`.

    (Lightning also puts the model's and data's hyperparameters into TensorBoard's HPARAMS tab; this is the whole
    run: trainer, callbacks and seed included.) A fit logs it when training starts, at the step it starts from (a
    resumed run's settings may differ from the first process's), once qlora_lit.resume.ResumedRun has told
    TensorBoard where this process's events begin.
    """

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.text = verbatim(self.parser.dump(self.config, skip_none=False))
        if stage != "fit":
            log_text(trainer, "config", self.text, step=trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(self, "text", None) is not None and trainer.is_global_zero:
            log_text(trainer, "config", self.text, step=trainer.global_step)
            self.text = None
