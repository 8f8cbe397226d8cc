"""Callbacks that write what a run leaves behind: the PEFT adapter folder and the data statistics."""

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
DATA_STATS_NAME = "data_stats.json"


class DataStatsExport(Callback):
    """Writes `<log_dir>/data_stats.json` at the start of fit (rank 0): rows read, dropped (empty, duplicate,
    over-long), truncated and kept, as the data module counted them, so a run records what it trained on."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stats = getattr(trainer.datamodule, "stats", None)
        if not trainer.is_global_zero or not stats:
            return
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / DATA_STATS_NAME).write_text(json.dumps(stats, indent=2))


class AdapterExport(Callback):
    """Writes `<log_dir>/<dirname>/`: adapter weights (safetensors), adapter config, tokenizer and the run config.

    It is rewritten with every saved checkpoint and at the end of fit, by rank 0 only, and replaced atomically so an
    interrupted write never leaves a half adapter where the last good one was.

    Args:
        dirname: folder name inside the run's log directory.
    """

    def __init__(self, dirname: str = "adapter") -> None:
        self.dirname = dirname

    def adapter_dir(self, trainer: L.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir) / self.dirname

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
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if (log_dir / "config.yaml").is_file():
            shutil.copyfile(log_dir / "config.yaml", partial / CONFIG_NAME)
        if (log_dir / DATA_STATS_NAME).is_file():
            shutil.copyfile(log_dir / DATA_STATS_NAME, partial / DATA_STATS_NAME)
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
