"""A run resumed from a mid-epoch checkpoint, or a finished run extended with a larger max_steps, ends exactly where an
uninterrupted run ends (padded KoAlpaca rows; packed rows of conversations mixed with KoAlpaca rows by weight)."""

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


def run(
    root,
    max_steps: int,
    ckpt_path=None,
    pack_length: int | None = None,
    batch_size: int = 4,
    accumulate: int = 1,
    schedule: str = "cosine",
    val_size: int = 8,
    every: int | None = 3,
    path: str | list = SAMPLE_DATA,
) -> QLoRAModule:
    """A fit saving a checkpoint every `every` steps (`step=N.ckpt`), or only `last.ckpt` where it ends."""
    L.seed_everything(7)
    module = QLoRAModule(
        TINY_MODEL,
        quantization=QuantizationArgs(compute_dtype="float32"),
        lora=LoraArgs(r=4, alpha=8, dropout=0.1),  # dropout: the random stream must resume too
        optimizer=OptimizerArgs(lr=5e-3, warmup_steps=2, schedule=schedule),
    )
    data = KoAlpacaDataModule(
        path,
        TINY_MODEL,
        max_length=96,
        batch_size=2 if pack_length else batch_size,
        val_size=val_size,
        seed=3,
        pack_length=pack_length,  # 2 packed rows of 192 tokens: as many tokens as 4 padded examples of 96
    )
    if every:
        checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1, filename="{step}")
    else:  # Lightning saves last.ckpt at the end only when it saved no other checkpoint before
        checkpoints = ModelCheckpoint(dirpath=root, save_top_k=0, save_last=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        limit_val_batches=0,
        logger=False,
        use_distributed_sampler=False,
        callbacks=[checkpoints],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return module


def assert_same_adapters(module: QLoRAModule, expected: QLoRAModule) -> None:
    trained = {name: param for name, param in expected.named_parameters() if param.requires_grad}
    for name, param in module.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, trained[name], rtol=0, atol=0, msg=name)


MIXED = [{"path": "builtin:ko_chat_sample.jsonl", "weight": 0.5}, {"path": SAMPLE_DATA, "weight": 0.5}]


@pytest.mark.parametrize(("pack_length", "path"), [(None, SAMPLE_DATA), (192, MIXED)], ids=["padded", "packed-mixed"])
def test_mid_epoch_resume_equals_uninterrupted_run(tmp_path, pack_length, path):
    uninterrupted = run(tmp_path / "a", max_steps=7, pack_length=pack_length, path=path)
    assert uninterrupted.trainer.num_training_batches > 3  # the checkpoint at step 3 is mid-epoch
    resumed = run(tmp_path / "b", 7, ckpt_path=tmp_path / "a" / "step=3.ckpt", pack_length=pack_length, path=path)
    assert_same_adapters(resumed, uninterrupted)


def test_extending_a_finished_run_continues_where_it_stopped(tmp_path):
    """2 steps, then the same run to 4 steps: Lightning counts the epoch that max_steps ended as complete, so
    last.ckpt says epoch 1; the data went on with epoch 1's order and the adapter differed from a 4-step run's."""
    uninterrupted = run(tmp_path / "a", max_steps=4)
    run(tmp_path / "b", max_steps=2, every=None)
    assert torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["epoch"] == 1
    extended = run(tmp_path / "b", max_steps=4, ckpt_path=tmp_path / "b" / "last.ckpt", every=None)
    assert_same_adapters(extended, uninterrupted)


def test_extending_at_an_epoch_boundary_and_under_gradient_accumulation(tmp_path):
    """5 batches an epoch, 2 micro-batches a step: step 3 closes the epoch with a 1-batch step. A run stopped at the
    epoch's end (step 3) resumes inside Lightning's used-up epoch; one stopped at step 2 has that last batch left.
    Both extended to step 4 equal the uninterrupted run (a constant learning rate: a cosine schedule depends on
    max_steps)."""
    settings = {"accumulate": 2, "schedule": "constant", "val_size": 218, "every": None}  # 20 rows: 5 batches of 4
    uninterrupted = run(tmp_path / "a", max_steps=4, **settings)
    assert uninterrupted.trainer.num_training_batches == 5
    for stop in (3, 2):
        run(tmp_path / f"stop{stop}", max_steps=stop, **settings)
        assert torch.load(tmp_path / f"stop{stop}" / "last.ckpt", weights_only=True)["global_step"] == stop
        extended = run(tmp_path / f"stop{stop}", 4, ckpt_path=tmp_path / f"stop{stop}" / "last.ckpt", **settings)
        assert_same_adapters(extended, uninterrupted)
