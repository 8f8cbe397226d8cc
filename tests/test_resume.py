"""A run resumed from a mid-epoch checkpoint ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import SAMPLE_DATA, TINY_MODEL
from lightning.pytorch.callbacks import ModelCheckpoint

from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.model import LoraArgs, QuantizationArgs
from qlora_lit.module import QLoRAModule
from qlora_lit.optim import OptimizerArgs


def run(root, max_steps: int, ckpt_path=None, pack_length: int | None = None) -> QLoRAModule:
    L.seed_everything(7)
    module = QLoRAModule(
        TINY_MODEL,
        quantization=QuantizationArgs(compute_dtype="float32"),
        lora=LoraArgs(r=4, alpha=8, dropout=0.1),  # dropout: the random stream must resume too
        optimizer=OptimizerArgs(lr=5e-3, warmup_steps=2),
    )
    data = KoAlpacaDataModule(
        SAMPLE_DATA,
        TINY_MODEL,
        max_length=96,
        batch_size=2 if pack_length else 4,
        val_size=8,
        seed=3,
        pack_length=pack_length,  # 2 packed rows of 192 tokens: as many tokens as 4 padded examples of 96
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        limit_val_batches=0,
        logger=False,
        use_distributed_sampler=False,
        callbacks=[ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1, filename="{step}")],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return module


@pytest.mark.parametrize("pack_length", [None, 192], ids=["padded", "packed"])
def test_mid_epoch_resume_equals_uninterrupted_run(tmp_path, pack_length):
    uninterrupted = run(tmp_path / "a", max_steps=7, pack_length=pack_length)
    assert uninterrupted.trainer.num_training_batches > 3  # the checkpoint at step 3 is mid-epoch
    resumed = run(tmp_path / "b", max_steps=7, ckpt_path=tmp_path / "a" / "step=3.ckpt", pack_length=pack_length)
    expected = {k: v for k, v in uninterrupted.named_parameters() if v.requires_grad}
    for name, param in resumed.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, expected[name], rtol=0, atol=0, msg=name)
