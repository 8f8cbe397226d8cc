"""Faults that must end well: a non-finite loss, an unwritable output folder, a full disk (docs/RELIABILITY.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import DEMO_CONFIG, SAMPLE_DATA, SHORT_FIT, TINY_MODEL, HostWaitsIn
from faults import disk_full, half_write_then, safetensors_disk_full
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

import qlora_lit
from qlora_lit.checkpoint_io import AtomicCheckpointIO
from qlora_lit.cli import cli_main
from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.disk_space import run_size_estimate
from qlora_lit.errors import TrainingError
from qlora_lit.model import LoraArgs, QuantizationArgs
from qlora_lit.module import QLoRAModule


class NaNAtStep2(QLoRAModule):
    def loss_sum(self, batch):
        loss_sum, count = super().loss_sum(batch)
        return (loss_sum * float("nan"), count) if self.global_step == 2 else (loss_sum, count)


def fit(module: QLoRAModule, root, callbacks: tuple = (), accumulate: int = 1) -> L.Trainer:
    data = KoAlpacaDataModule(SAMPLE_DATA, TINY_MODEL, max_length=96, batch_size=4, val_size=8)
    trainer = L.Trainer(
        accelerator="cpu",
        callbacks=list(callbacks),
        accumulate_grad_batches=accumulate,
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


class AdapterAfterEachStep(L.Callback):
    """The LoRA weights after each optimizer step, by the number of steps taken."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, module, *args) -> None:
        trained = (p for p in module.named_parameters() if p[1].requires_grad)
        self.after[trainer.global_step] = {name: param.detach().clone() for name, param in trained}


def test_a_nan_loss_stops_before_its_steps_update_is_applied(tmp_path):
    module, steps = nan_module("stop"), AdapterAfterEachStep()
    with pytest.raises(TrainingError, match="the training loss is nan at global step 2, batch 4 of epoch 0"):
        fit(module, tmp_path, [steps], accumulate=2)  # step 2 is batches 4 and 5: both run, then the stop
    for name, param in module.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.detach(), steps.after[2][name], rtol=0, atol=0, msg=name)


def test_a_nan_loss_on_another_rank_stops_every_rank_in_one_reduction():
    module, reductions = nan_module("stop"), []

    def reduce(flags, reduce_op):  # rank 1 had a NaN in the step's second micro-batch
        reductions.append((flags.tolist(), reduce_op))
        return torch.maximum(flags, torch.tensor([0.0, 1.0]))

    strategy = SimpleNamespace(reduce=reduce)
    module._trainer = SimpleNamespace(world_size=2, strategy=strategy, global_step=7, current_epoch=1)
    # this rank's (batch index, loss sum, label tokens): finite
    module._step_losses = [(14, torch.tensor(2.5), torch.tensor(9)), (15, torch.tensor(2.25), torch.tensor(7))]
    expected = "the training loss is NaN or infinite on another rank at global step 7, batch 15 of epoch 1"
    with pytest.raises(TrainingError, match=expected):
        module.on_before_optimizer_step(None)
    assert reductions == [([0.0, 0.0], "max")] and module._step_losses == []


class MicroBatchWaits(L.Callback):
    """qlora_lit's own host waits (HostWaitsIn) from the start of each micro-batch to the optimizer step's hooks."""

    def __init__(self) -> None:
        self.mode = HostWaitsIn(Path(qlora_lit.__file__).parent)
        self.active = False

    def on_train_batch_start(self, *args) -> None:
        self.mode.__enter__()
        self.active = True

    def on_before_optimizer_step(self, *args) -> None:
        self.stop()  # callbacks' hooks run before the module's, which reads the step's losses

    def on_train_batch_end(self, *args) -> None:
        self.stop()

    def stop(self) -> None:
        if self.active:
            self.mode.__exit__(None, None, None)
            self.active = False


@pytest.mark.parametrize("chunk", [0, 16], ids=["full-logits", "chunked-loss"])
def test_training_micro_batches_make_the_host_wait_nowhere_in_qlora_lit(tmp_path, chunk):
    """base.yaml's full logits and lowmem.yaml's chunked loss, whose labelled positions are found on the host."""
    waits = MicroBatchWaits()
    quantization = QuantizationArgs(compute_dtype="float32")
    module = QLoRAModule(TINY_MODEL, quantization=quantization, lora=LoraArgs(r=4), loss_chunk_tokens=chunk)
    trainer = fit(module, tmp_path, [waits], accumulate=2)
    assert trainer.global_step == 4 and waits.mode.ops > 0 and waits.mode.waits == []


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


def test_checkpoints_are_written_beside_their_target_never_through_the_temp_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["qlora_lit"])
    cli = cli_main(["--config", DEMO_CONFIG, "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)
    checkpoint_io = cli.trainer.strategy.checkpoint_io
    assert isinstance(checkpoint_io, AtomicCheckpointIO)
    # Lightning's own save writes into the temp folder and moves the file, a copy when that is another filesystem.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    checkpoint_io.save_checkpoint({"step": torch.tensor(3)}, tmp_path / "run" / "last.ckpt")
    assert torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["step"] == 3
    assert [path.name for path in (tmp_path / "run").iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize(
    ("file_name", "nth", "fault", "adapter_step"),
    # Step 4's write: last.ckpt and the adapter are written once per validation
    [("last.ckpt", 2, disk_full, 4), ("adapter_model.safetensors", 2, safetensors_disk_full, 2)],
    ids=["checkpoint", "adapter"],
)
def test_a_full_disk_mid_write_ends_with_a_message_and_keeps_the_previous_files(
    file_name, nth, fault, adapter_step, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(sys, "argv", ["qlora_lit"])
    half_write_then(fault, file_name, nth, monkeypatch.setattr)
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*SHORT_FIT, "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "qlora_lit: training stopped: no space left on the device to write" in error, error[-3000:]
    run = tmp_path / "demo" / "version_0"
    assert not list(run.rglob("*.partial"))  # the half-written file is gone (it would hold the little space left)
    for checkpoint in (run / "checkpoints").glob("*.ckpt"):
        torch.load(checkpoint, weights_only=True)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert json.loads((run / "adapter" / "trainer_state.json").read_text())["global_step"] == adapter_step
    load_file(run / "adapter" / "adapter_model.safetensors")


def test_too_little_free_space_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["qlora_lit"])
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30, 2**20))
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*SHORT_FIT, "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"not enough free disk space in {tmp_path / 'demo' / 'version_0'}: 1 MiB free" in error, error[-3000:]
    assert "the run needs about 102 MiB" in error
    assert "trainable parameters" not in error  # stopped before the model was loaded


def test_the_space_estimate_counts_checkpoints_adapter_and_logs():
    checkpoint = ModelCheckpoint(monitor="val_loss", save_top_k=3, save_last=True)
    # 3 best + last.ckpt + one being written, 12 bytes per parameter each; the adapter twice at 4; 100 MiB of logs
    assert run_size_estimate(10**6, checkpoint) == 5 * 12 * 10**6 + 2 * 4 * 10**6 + 100 * 2**20


@pytest.mark.slow
def test_hub_tokens_in_the_environment_are_never_printed_or_saved(tmp_path):
    secret = "hf_qloraLitFakeSecret7c1e9a0b4d"
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env.update(HF_TOKEN=secret, HUGGING_FACE_HUB_TOKEN=secret, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    short = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--data.cache_dir", "cache"]
    command = [sys.executable, "-m", "qlora_lit", "fit", "--config", DEMO_CONFIG, *short]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert secret.encode() not in result.stdout + result.stderr
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    names = {path.name for path in written}
    assert {"config.yaml", "last.ckpt", "adapter_model.safetensors", "qlora_lit_config.yaml"} <= names
    assert any(name.startswith("events.out.tfevents") for name in names) and any("tokens-" in n for n in names)
    assert [path for path in written if secret.encode() in path.read_bytes()] == []
