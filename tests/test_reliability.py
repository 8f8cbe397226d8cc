"""Faults that must end well: a non-finite loss, an unwritable output folder (docs/RELIABILITY.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import SAMPLE_DATA, TINY_MODEL

from qlora_lit.cli import cli_main
from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.errors import TrainingError
from qlora_lit.model import LoraArgs, QuantizationArgs
from qlora_lit.module import QLoRAModule


class NaNAtStep2(QLoRAModule):
    def loss_sum(self, batch):
        loss_sum, count = super().loss_sum(batch)
        return (loss_sum * float("nan"), count) if self.global_step == 2 else (loss_sum, count)


def fit(module: QLoRAModule, root) -> L.Trainer:
    data = KoAlpacaDataModule(SAMPLE_DATA, TINY_MODEL, max_length=96, batch_size=4, val_size=8)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        limit_val_batches=0,
        default_root_dir=root,
        logger=L.pytorch.loggers.TensorBoardLogger(root, name="t"),
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, data)
    return trainer


def nan_module(policy: str) -> QLoRAModule:
    return NaNAtStep2(
        TINY_MODEL, quantization=QuantizationArgs(compute_dtype="float32"), lora=LoraArgs(r=4), nonfinite_loss=policy
    )


def test_a_nan_loss_stops_training_naming_the_step(tmp_path):
    with pytest.raises(TrainingError, match="the training loss is nan at global step 2"):
        fit(nan_module("stop"), tmp_path)


def test_a_nan_loss_can_skip_the_batch_instead(tmp_path):
    module = nan_module("skip")
    trainer = fit(module, tmp_path)
    assert trainer.global_step == 4  # the skipped batch took no optimizer step; later ones did
    assert all(torch.isfinite(p).all() for p in module.parameters() if p.requires_grad)


def test_an_unwritable_output_folder_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["qlora_lit"])
    (tmp_path / "a-file").write_text("not a folder")
    demo = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", demo, "--trainer.logger.init_args.save_dir", str(tmp_path / "a-file" / "runs")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "cannot write the run's outputs to" in error and "a-file/runs" in error
    assert "trainable parameters" not in error  # stopped before the model was loaded
