"""Callbacks that write what a run leaves behind: the PEFT adapter folder, the data statistics and the answers
of `predict`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter, Callback

from qlora_lit.errors import TrainingError, is_disk_full
from qlora_lit.fsdp import QLoRAFSDPStrategy, save_gathered_adapter
from qlora_lit.run_files import CONFIG_NAME, DATA_STATS_NAME
from qlora_lit.tokenizer import load_tokenizer


def run_dir(trainer: L.Trainer) -> Path:
    """The run's log directory, read from the logger: `trainer.log_dir` broadcasts, which deadlocks DDP when only
    rank 0 asks."""
    logger_dir = trainer.loggers[0].log_dir if trainer.loggers else None
    return Path(logger_dir or trainer.default_root_dir)


class DataStatsExport(Callback):
    """Writes `<log_dir>/data_stats.json` at the start of fit (rank 0): rows read, dropped (empty, duplicate,
    over-long), truncated and kept, as the data module counted them, so a run records what it trained on."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stats = getattr(trainer.datamodule, "stats", None)
        if not trainer.is_global_zero or not stats:
            return
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / DATA_STATS_NAME).write_text(json.dumps(stats, indent=2))


class AdapterExport(Callback):
    """Writes `<log_dir>/<dirname>/`: adapter weights (safetensors), adapter config, tokenizer and the run config.

    It is rewritten with every saved checkpoint and at the end of fit, by rank 0 only, and replaced atomically so an
    interrupted write never leaves a half adapter where the last good one was. Under FSDP every rank first helps
    gather the sharded adapter weights.

    Args:
        dirname: folder name inside the run's log directory.
    """

    def __init__(self, dirname: str = "adapter") -> None:
        self.dirname = dirname
        self.exported_step: int | None = None

    def adapter_dir(self, trainer: L.Trainer) -> Path:
        return run_dir(trainer) / self.dirname

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.export(trainer, pl_module, checkpoint["state_dict"])

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.export(trainer, pl_module)

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule, state: dict | None = None) -> None:
        """`state`: the module's state dict when a checkpoint has just gathered it (under FSDP, saves a second
        gather)."""
        if pl_module.model is None or trainer.global_step == self.exported_step:
            return  # the weights change only at optimizer steps (one step saves its best and its last checkpoint)
        self.exported_step = trainer.global_step
        weights = None  # PEFT reads them from the model, unless they are sharded
        if isinstance(trainer.strategy, QLoRAFSDPStrategy):
            state = state if state is not None else trainer.strategy.lightning_module_state_dict()
            weights = {key.removeprefix("model."): value for key, value in state.items()}
        if not trainer.is_global_zero:
            return
        target = self.adapter_dir(trainer)
        partial = target.with_name(f".{target.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            self.write_adapter(trainer, pl_module, partial, weights)
        except BaseException as err:
            shutil.rmtree(partial, ignore_errors=True)  # the previous adapter stays in `target`
            if is_disk_full(err):
                raise TrainingError(
                    f"no space left on the device to write the adapter to {partial} ({err}). An adapter already in "
                    f"{target} is complete; free some space and resume from the last checkpoint"
                ) from err
            raise
        _replace_dir(partial, target)

    def write_adapter(
        self, trainer: L.Trainer, pl_module: L.LightningModule, partial: Path, weights: dict | None = None
    ) -> None:
        if weights is None:
            pl_module.model.save_pretrained(partial, safe_serialization=True)
        else:
            save_gathered_adapter(pl_module.model, weights, partial)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) or load_tokenizer(
            pl_module.model_name_or_path, pl_module.trust_remote_code
        )
        tokenizer.save_pretrained(partial)
        folder = run_dir(trainer)
        for name, copy_name in (("config.yaml", CONFIG_NAME), (DATA_STATS_NAME, DATA_STATS_NAME)):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, partial / copy_name)
        progress = {"global_step": trainer.global_step, "epoch": trainer.current_epoch}
        (partial / "trainer_state.json").write_text(json.dumps(progress))


class PredictionWriter(BasePredictionWriter):
    """Writes the answers of `predict` as JSONL: each prompts-file row plus "generated", in the file's order.

    Each rank appends to its own part file as its batches finish (no two processes write one file, nothing waits in
    memory); at the end rank 0 merges the parts in order. On several nodes, `output` must be on a shared filesystem.

    Args:
        output: the JSONL file; default `<log_dir>/predictions.jsonl`.
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self.target: Path | None = None  # rank 0's output path, known to every rank once predict starts

    def output_path(self, trainer: L.Trainer) -> Path:
        if self.output:
            return Path(self.output)
        return run_dir(trainer) / "predictions.jsonl"

    def part_path(self, rank: int) -> Path:
        return self.target.with_name(f".{self.target.name}.rank{rank}")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Rank 0's: by default the output goes in the logger's folder, whose next version another rank could count
        # differently once rank 0 has created it.
        self.target = Path(trainer.strategy.broadcast(str(self.output_path(trainer))))
        part = self.part_path(trainer.global_rank)
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_text("")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        rows = trainer.datamodule.predict_rows
        with self.part_path(trainer.global_rank).open("a", encoding="utf-8") as part:
            for index, answer in zip(prediction["index"], prediction["generated"], strict=True):
                part.write(json.dumps([index, {**rows[index], "generated": answer}], ensure_ascii=False) + "\n")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier()  # every rank's part is complete
        if not trainer.is_global_zero:
            return
        parts = [self.part_path(rank) for rank in range(trainer.world_size)]
        indexed = [json.loads(line) for part in parts for line in part.read_text(encoding="utf-8").splitlines()]
        output = self.target
        partial = output.with_name(f".{output.name}.partial")
        with partial.open("w", encoding="utf-8") as sink:
            for _, row in sorted(indexed, key=lambda item: item[0]):
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(partial, output)
        for part in parts:
            part.unlink()


def _replace_dir(source: Path, target: Path) -> None:
    """Move `source` to `target`; the old `target` disappears only after the new one is complete. What the old one
    holds that the new one does not (files the user put there: answers, a merged model) moves into the new one."""
    retired = target.with_name(f".{target.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    if target.is_dir():
        for entry in target.iterdir():
            if not (source / entry.name).exists():
                os.replace(entry, source / entry.name)
    if target.exists():
        os.replace(target, retired)
    os.replace(source, target)
    shutil.rmtree(retired, ignore_errors=True)
