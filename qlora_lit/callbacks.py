"""Callbacks that write the artifact users want: a PEFT adapter folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from qlora_lit.data.datamodule import load_tokenizer

CONFIG_NAME = "qlora_lit_config.yaml"


class AdapterExport(Callback):
    """Writes `<log_dir>/<dirname>/`: adapter weights (safetensors), adapter config, tokenizer and the run config.

    It is rewritten with every saved checkpoint and at the end of fit, by rank 0 only, and replaced atomically so an
    interrupted write never leaves a half adapter where the last good one was.

    Args:
        dirname: folder name inside the run's log directory.
    """

    def __init__(self, dirname: str = "adapter") -> None:
        self.dirname = dirname

    @staticmethod
    def run_dir(trainer: L.Trainer) -> Path:
        """The run's log directory, read from the logger: `trainer.log_dir` broadcasts, and only rank 0 gets here."""
        logger_dir = trainer.loggers[0].log_dir if trainer.loggers else None
        return Path(logger_dir or trainer.default_root_dir)

    def adapter_dir(self, trainer: L.Trainer) -> Path:
        return self.run_dir(trainer) / self.dirname

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.export(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.export(trainer, pl_module)

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or pl_module.model is None:
            return
        target = self.adapter_dir(trainer)
        partial = target.with_name(f".{target.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        pl_module.model.save_pretrained(partial, safe_serialization=True)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) or load_tokenizer(pl_module.model_name_or_path)
        tokenizer.save_pretrained(partial)
        run_config = self.run_dir(trainer) / "config.yaml"
        if run_config.is_file():
            shutil.copyfile(run_config, partial / CONFIG_NAME)
        progress = {"global_step": trainer.global_step, "epoch": trainer.current_epoch}
        (partial / "trainer_state.json").write_text(json.dumps(progress))
        _replace_dir(partial, target)


def _replace_dir(source: Path, target: Path) -> None:
    """Move `source` to `target`; the old `target` disappears only after the new one is complete."""
    retired = target.with_name(f".{target.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    if target.exists():
        os.replace(target, retired)
    os.replace(source, target)
    shutil.rmtree(retired, ignore_errors=True)
