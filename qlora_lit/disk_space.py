"""Whether outputs can be written and fit on the disk, checked before the model loads: a full disk or a mistyped
folder fails in seconds, not at the first checkpoint an hour in (or after a merge of many minutes)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint

from qlora_lit.errors import ConfigError


def write_problem(folder: Path) -> OSError | None:
    """Why files cannot be written into `folder` (created if absent), or None when they can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return err
    return None


def ensure_writable(folder: Path, what: str, setting: str) -> None:
    """Fail with one message naming `setting` if `what` cannot be written into `folder` (created if absent)."""
    err = write_problem(folder)
    if err is not None:
        raise ConfigError(f"cannot write {what} to {folder}: {err}. Point {setting} at a writable folder")


# A checkpoint holds, per trainable parameter, its fp32 weight (4 bytes) and AdamW's two fp32 moments (8 bytes);
# the 8-bit optimizers keep 1-byte moments for large tensors, so 12 errs on the safe side.
CHECKPOINT_BYTES_PER_PARAMETER = 12
ADAPTER_BYTES_PER_PARAMETER = 4  # adapter_model.safetensors, fp32
OTHER_BYTES = 100 * 2**20  # tokenizer copies in the adapter folder, TensorBoard events, config, data statistics


def checkpoints_on_disk(checkpoint: ModelCheckpoint | None) -> int:
    """The most checkpoint files a run has at once: the `save_top_k` best (one for -1, keep-all, which has no bound
    up front), `last.ckpt`, and the new file written before the one it replaces is deleted."""
    if checkpoint is None:
        return 1  # PreemptionCheckpoint's last.ckpt
    return max(checkpoint.save_top_k, 1) + bool(checkpoint.save_last) + 1


def run_size_estimate(trainable_parameters: int, checkpoint: ModelCheckpoint | None) -> int:
    """Bytes a run needs at its fullest: the checkpoints, the adapter twice (the new folder is complete before the
    old one goes), and OTHER_BYTES."""
    checkpoints = checkpoints_on_disk(checkpoint) * trainable_parameters * CHECKPOINT_BYTES_PER_PARAMETER
    return checkpoints + 2 * trainable_parameters * ADAPTER_BYTES_PER_PARAMETER + OTHER_BYTES


def ensure_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ConfigError(
            f"not enough free disk space in {folder}: {size_text(free)} free, the run needs about {size_text(needed)} "
            "(checkpoints, adapter and logs). Free some space or point trainer.logger.init_args.save_dir "
            "(or trainer.default_root_dir) at a larger disk"
        )


def size_text(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"
