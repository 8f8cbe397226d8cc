"""Stop cleanly when the job is about to be killed: save at an optimizer-step boundary, requeue on Slurm, exit."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException


class PreemptionCheckpoint(Callback):
    """On SIGUSR1 (Slurm's warning before a time limit or preemption) or SIGTERM, finish the current optimizer step,
    save `last.ckpt` (adapters, optimizer, loop state and data position), requeue a Slurm job, and stop.

    Lightning's own Slurm handler saves from inside the signal handler, in the middle of a step, and each rank on
    its own; here the ranks agree at the next optimizer-step boundary (one tiny all-reduce per step) and stop
    together once that step is over, its validation and logging included: the run then stops where an uninterrupted
    run would have gone on, and the resumed run continues bit for bit as the uninterrupted one (stopping right away
    instead would skip the step's scheduled validation; `trainer.should_stop` would add a validation of its own,
    whose data loader draws from the random stream). `fit --ckpt_path last` resumes.

    Args:
        requeue: on SIGUSR1 under Slurm, run `scontrol requeue $SLURM_JOB_ID` after saving.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, requeue: bool = True) -> None:
        self.requeue = requeue
        self.received: int | None = None
        self.stopping: int | None = None  # the signal all ranks agreed to stop for
        self.saved_step: int | None = None  # the step of this process's latest checkpoint
        self.previous: dict[int, Any] = {}  # the process's own handlers, from before the fit
        self.active = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # From before the model loads: a signal's default action ends the process, and Slurm's warning may come early
        # (preemption). It is acted on at the first optimizer-step boundary.
        self.received = self.stopping = self.saved_step = None
        if stage == "fit" and self.in_main_thread():
            self.previous = {signum: signal.getsignal(signum) for signum in self.SIGNALS}
            self.active = True
            self.install_handlers()

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's own handlers, set just before the sanity check, would end the fit after its first batch with
        # exit status 0 and nothing saved: ours keep the signal for the first optimizer-step boundary.
        self.install_handlers()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install_handlers()  # again: Lightning set its own just before training
        if not self.stopping:  # a signal its handlers saw (the sanity check's end) is ours to act on, at a step's end
            trainer._signal_connector.received_sigterm = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning restores the handlers it found, which were ours: the process's own come back here.
        self.active = False
        for signum, handler in self.previous.items():
            if self.in_main_thread() and handler is not None:
                signal.signal(signum, handler)

    def install_handlers(self) -> None:
        if self.in_main_thread():  # signal handlers can only be installed from the main thread
            for signum in self.SIGNALS:
                signal.signal(signum, self._on_signal)

    @staticmethod
    def in_main_thread() -> bool:
        return threading.current_thread() is threading.main_thread()

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.active:
            self.received = self.received or signum
            return
        # Still installed after the fit (after an error Lightning puts back the handlers it found, ours): the signal
        # goes to the process's own handling, as before the fit.
        signal.signal(signum, self.previous.get(signum) or signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches or self.stopping:
            return  # mid-accumulation: the partial gradients would be lost
        signum = self.received or 0
        if trainer.world_size > 1:  # every rank stops at the same step, or the others wait for it forever
            flag = torch.tensor(float(signum), device=pl_module.device)
            signum = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        if signum:
            self.stopping = signum
            # Lightning's own way to stop for SIGTERM: it raises SIGTERMException once this step is over (after a
            # validation due at this step and the step's logging), and every rank does it at the same step.
            trainer._signal_connector.received_sigterm = True

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stopping:  # a validation due at this step runs whole (Lightning's flag would end it after a batch)
            trainer._signal_connector.received_sigterm = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stopping:
            trainer._signal_connector.received_sigterm = True
            checkpoint = trainer.checkpoint_callback
            if checkpoint is None or not checkpoint.save_last:  # else ModelCheckpoint saves last.ckpt right after this
                # Saved here, inside the step's validation, as ModelCheckpoint saves: a checkpoint saved after it (in
                # on_exception) resumed with every later TensorBoard point one step late.
                self.save(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.saved_step = trainer.global_step

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not self.stopping and isinstance(exception, SIGTERMException):  # Lightning's handlers took it, early
            rank_zero_warn(
                f"a stop signal arrived before the first optimizer step (at step {trainer.global_step}): stopped "
                "without a checkpoint; run the same command again"
            )
        if not self.stopping or not isinstance(exception, SIGTERMException):
            self.teardown(trainer, pl_module, "fit")
            return
        if self.saved_step != trainer.global_step:  # else the step's validation has just saved it
            self.save(trainer)
        name = signal.Signals(self.stopping).name
        rank_zero_info(f"received {name}: stopped at step {trainer.global_step}, saved (--ckpt_path last resumes)")
        if self.stopping == signal.SIGUSR1 and self.requeue and trainer.is_global_zero and "SLURM_JOB_ID" in os.environ:
            self._requeue()
        self.teardown(trainer, pl_module, "fit")

    def save(self, trainer: L.Trainer) -> None:
        path = self.checkpoint_path(trainer)
        if trainer.checkpoint_callback is not None:  # before saving, as it is part of the saved state: a resumed
            trainer.checkpoint_callback.last_model_path = str(path)  # run would write last-v1.ckpt beside it
        trainer.save_checkpoint(path)

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> Path:
        """ModelCheckpoint's own `last.ckpt`, so `--ckpt_path last` finds it and later saves overwrite the same file."""
        callback = trainer.checkpoint_callback
        if callback is None or callback.dirpath is None:
            return Path(trainer.default_root_dir) / "last.ckpt"
        return Path(callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST))

    @staticmethod
    def _requeue() -> None:
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode:
            rank_zero_warn(f"scontrol requeue {job} failed: {result.stderr.strip()}")
        else:
            rank_zero_info(f"requeued Slurm job {job}; it resumes from last.ckpt")
