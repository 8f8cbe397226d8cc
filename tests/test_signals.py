"""Signals and kills outside Slurm: SIGTERM saves a resumable checkpoint at an optimizer-step boundary; kill -9, even
in the middle of writing a checkpoint or the adapter, leaves complete files to resume from (docs/RELIABILITY.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import SHORT_FIT, TINY_MODEL, NoHostWaits
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_and_the_run_resumes_from_it(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "qlora_lit", "fit", "--config", str(ROOT / "configs" / "demo.yaml")]
    short = ["--trainer.max_steps", "60", "--trainer.enable_progress_bar", "false", "--samples.prompts", "[]"]
    process = subprocess.Popen(
        [*command, *short], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    checkpoints = tmp_path / "runs" / "demo" / "version_0" / "checkpoints"
    deadline = time.time() + 300  # the signal lands mid-training, however slow the machine: after step 20's checkpoint
    while not list(checkpoints.glob("step000020*.ckpt")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output = process.stdout.readlines()
    assert process.wait(timeout=120) == 0, "".join(output)[-3000:]
    log = "".join(output)
    assert "received SIGTERM: stopped at step" in log, log[-3000:]
    checkpoint = checkpoints / "last.ckpt"
    stopped_at = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 20 <= stopped_at < 60

    resumed = subprocess.run(
        [*command, *short, "--ckpt_path", str(checkpoint)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"after {stopped_at} batches" in resumed.stderr + resumed.stdout
    assert "`weights_only` was not set" not in resumed.stderr  # resumed with torch.load(weights_only=True)


def killed_mid_write(name: str, nth: int, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """A demo fit SIGKILLed halfway through writing the `nth` file called `name` (tests/faults.py)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, str(ROOT / "tests" / "faults.py"), name, str(nth), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_kill_9_while_writing_last_ckpt_keeps_the_previous_one_and_resume_finishes(tmp_path, monkeypatch):
    from qlora_lit.cli import cli_main

    killed = killed_mid_write("last.ckpt", 2, tmp_path, *SHORT_FIT)  # the second last.ckpt: step 4's
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = tmp_path / "runs" / "demo" / "version_0" / "checkpoints"
    assert (checkpoints / ".last.ckpt.partial").stat().st_size > 0  # the kill landed in the middle of the write
    for checkpoint in checkpoints.glob("*.ckpt"):  # whatever `--ckpt_path last` or best could pick is whole
        torch.load(checkpoint, weights_only=True)
    last = checkpoints / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2

    monkeypatch.setattr(sys, "argv", ["qlora_lit"])
    save_dir = ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    resumed = cli_main([*SHORT_FIT, *save_dir, "--ckpt_path", str(last)])  # in-process: no second start-up
    assert resumed.trainer.ckpt_path == str(last) and resumed.trainer.global_step == 6


@pytest.mark.slow
def test_kill_9_while_writing_the_adapter_keeps_the_previous_adapter_loadable(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_lit.assets import resolve_asset

    # The adapter is exported once per saved step: the second export is step 4's.
    killed = killed_mid_write("adapter_model.safetensors", 2, tmp_path, *SHORT_FIT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = tmp_path / "runs" / "demo" / "version_0"
    assert (run / ".adapter.partial" / "adapter_model.safetensors").stat().st_size > 0  # killed mid-write
    assert json.loads((run / "adapter" / "trainer_state.json").read_text())["global_step"] == 2
    base = AutoModelForCausalLM.from_pretrained(resolve_asset(TINY_MODEL))
    model = PeftModel.from_pretrained(base, run / "adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_a_single_process_checks_for_signals_without_touching_the_device():
    """The check runs after every optimizer step; a process on its own needs no tensor for it (reading one back
    from a GPU makes the host wait for the device)."""
    from qlora_lit.preemption import PreemptionCheckpoint

    trainer = SimpleNamespace(accumulate_grad_batches=1, world_size=1)
    with NoHostWaits() as guard:
        PreemptionCheckpoint().on_train_batch_end(trainer, SimpleNamespace(device=torch.device("cpu")), None, {}, 0)
    assert guard.ops == 0


def test_the_processs_own_signal_handlers_come_back_after_a_fit():
    """Handlers are installed from setup (before the model loads); after the fit the process's own are back, and one
    of ours that Lightning puts back after an error hands the signal to them."""
    from qlora_lit.preemption import PreemptionCheckpoint

    got = []
    own = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    try:
        callback = PreemptionCheckpoint()
        callback.setup(SimpleNamespace(), None, "fit")
        assert signal.getsignal(signal.SIGUSR1) == callback._on_signal
        os.kill(os.getpid(), signal.SIGUSR1)
        assert callback.received == signal.SIGUSR1 and got == []  # during the fit: kept for the next step boundary
        callback.teardown(SimpleNamespace(), None, "fit")
        assert signal.getsignal(signal.SIGUSR1) != callback._on_signal
        signal.signal(signal.SIGUSR1, callback._on_signal)  # as Lightning's teardown after an error leaves it
        os.kill(os.getpid(), signal.SIGUSR1)
        assert got == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, own)


class SignalAtSanityCheck(Callback):
    """Sends SIGTERM to this process at the sanity check's first batch (the fit's validation batches before
    training)."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_the_sanity_check_stops_at_the_first_step_with_a_checkpoint(tmp_path, caplog, monkeypatch):
    """Lightning's handlers, set just before the sanity check, took it: the fit ended after one sanity batch, exit
    status 0, no checkpoint, no adapter, no word (a `fit && export` script went on)."""
    from qlora_lit.cli import cli_main

    monkeypatch.setattr(sys, "argv", ["qlora_lit"])
    args = [*SHORT_FIT, "--trainer.logger.init_args.save_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info, caplog.at_level("INFO"):
        cli_main([*args, "--trainer.callbacks+=test_signals.SignalAtSanityCheck"])
    assert exit_info.value.code in (0, None)
    assert "received SIGTERM: stopped at step 1, saved (--ckpt_path last resumes)" in caplog.text
    checkpoint = tmp_path / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 1


class SignalAtBatch(Callback):
    """Sends SIGTERM to this process as training batch `batch` (counted from 0) starts."""

    def __init__(self, batch: int = 3) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.total.ready == self.batch + 1:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_stop_at_a_validation_step_without_save_last_resumes_with_the_same_tensorboard_steps(tmp_path, monkeypatch):
    """With checkpoint.save_last false and a validation that saves no top-k file, the stop's checkpoint was written
    after the validation: the resumed run logged every later point one step late (a gap, points past max_steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from qlora_lit.cli import cli_main

    monkeypatch.setattr(sys, "argv", ["qlora_lit"])
    settings = [*SHORT_FIT, "--trainer.log_every_n_steps", "1", "--checkpoint.save_last", "false"]
    settings += ["--checkpoint.save_top_k", "1", "--checkpoint.mode", "max"]  # the first validation stays the best

    def steps(save_dir: Path) -> list[int]:
        events = EventAccumulator(str(save_dir / "demo" / "version_0"), size_guidance={"scalars": 0})
        events.Reload()
        return [event.step for event in events.Scalars("train_loss")]

    cli_main([*settings, "--trainer.logger.init_args.save_dir", str(tmp_path / "whole")])
    stopped = [*settings, "--trainer.logger.init_args.save_dir", str(tmp_path / "stopped")]
    with pytest.raises(SystemExit):
        cli_main([*stopped, "--trainer.callbacks+=test_signals.SignalAtBatch"])  # stops at step 4, a validation step
    cli_main([*stopped, "--ckpt_path", "last"])
    assert steps(tmp_path / "stopped") == steps(tmp_path / "whole") == [0, 1, 2, 3, 4, 5]
