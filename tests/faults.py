"""Fault injection for the reliability tests: the Nth write of a named file stops halfway, then a fault strikes; or
one rank's training step raises.

As a script, the CLI killed (SIGKILL, no handler runs) halfway through the 2nd write of last.ckpt:

    python tests/faults.py last.ckpt 2 fit --config configs/demo.yaml ...

or rank 1 of a DDP fit raising at its 3rd optimizer step (Lightning starts the other ranks with the same command):

    python tests/faults.py raise 1 3 fit --config configs/demo.yaml --trainer.devices 2 ...
"""

from __future__ import annotations

import builtins
import errno
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft.peft_model
import safetensors.torch
from lightning.pytorch.callbacks import Callback


def kill_9() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def disk_full() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def safetensors_disk_full() -> None:
    """What safetensors raises on a full disk: its Rust writer keeps only the text of the OS error."""
    raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


class HalfWriter:
    """A file whose first write stores half of the bytes, then calls `fault`."""

    def __init__(self, file: Any, fault: Callable[[], None]) -> None:
        self.file = file
        self.fault = fault

    def write(self, data: bytes) -> int:
        self.file.write(bytes(data)[: len(data) // 2])
        self.file.flush()
        self.fault()
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)

    def __enter__(self) -> HalfWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.file.close()


def half_write_then(fault: Callable[[], None], name: str, nth: int, setattr: Callable = setattr) -> None:
    """The `nth` file written whose name contains `name` (`last.ckpt` matches `.last.ckpt.partial` too) gets half its
    bytes, then `fault()` runs. Checkpoints are written through Python's open(); adapter weights by peft through
    safetensors' own (Rust) writer, so both are wrapped. Pass `monkeypatch.setattr` to undo it after a test."""
    seen = 0

    def hit(path: str | os.PathLike) -> bool:
        nonlocal seen
        if name not in Path(path).name:
            return False
        seen += 1
        return seen == nth

    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if "wb" in mode and isinstance(file, str | os.PathLike) and hit(file):
            return HalfWriter(handle, fault)
        return handle

    real_save_file = peft.peft_model.safe_save_file

    def save_file(tensors, filename, metadata=None):
        if hit(filename):
            with real_open(filename, "wb") as file:
                HalfWriter(file, fault).write(safetensors.torch.save(tensors, metadata))
        return real_save_file(tensors, filename, metadata)

    setattr(builtins, "open", open_)
    setattr(peft.peft_model, "safe_save_file", save_file)


class SignalAt(Callback):
    """Sends this process `signum` at the Lightning hook `hook` (on_train_batch_start, on_before_backward,
    on_train_batch_end, on_validation_batch_start, on_save_checkpoint, ...) first reached once `step` optimizer steps
    are done: a kill or a signal at a chosen point of a run, for the chaos soak."""

    HOOKS = (
        "on_train_batch_start",
        "on_before_backward",
        "on_before_optimizer_step",
        "on_train_batch_end",
        "on_validation_batch_start",
        "on_save_checkpoint",
    )

    def __init__(self, step: int, signum: int, hook: str) -> None:
        assert hook in self.HOOKS, hook
        self.step, self.signum, self.hook, self.sent = step, signum, hook, False
        for name in self.HOOKS:
            setattr(self, name, self._reached if name == hook else self._ignored)

    def _reached(self, trainer, *args, **kwargs) -> None:
        if not self.sent and trainer.global_step >= self.step and not trainer.sanity_checking:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def _ignored(self, *args, **kwargs) -> None:
        pass


def raise_in_rank(rank: int, step: int, setattr: Callable = setattr) -> None:
    """The training step of global rank `rank` raises a RuntimeError once `step` optimizer steps are done."""
    from qlora_lit.module import QLoRAModule

    real_step = QLoRAModule.training_step

    def training_step(module, batch, batch_idx):
        if module.global_rank == rank and module.global_step == step:
            raise RuntimeError(f"a bad batch (injected at step {step})")
        return real_step(module, batch, batch_idx)

    setattr(QLoRAModule, "training_step", training_step)


if __name__ == "__main__":
    from qlora_lit.cli import cli_main

    if sys.argv[1] == "raise":
        raise_in_rank(int(sys.argv[2]), int(sys.argv[3]))
    else:
        half_write_then(kill_9, sys.argv[1], int(sys.argv[2]))
    cli_main(sys.argv[4 if sys.argv[1] == "raise" else 3 :])
