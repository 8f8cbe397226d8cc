"""Checkpoint files that are either complete or absent, whatever kills the process and wherever the temp folder is."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from qlora_lit.errors import TrainingError, is_disk_full


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `<name>.ckpt` as a hidden `.<name>.ckpt.partial` beside it, fsyncs it, then renames it over the target.

    Lightning's own save goes through an fsspec transaction whose temporary file lives in the system temp folder
    (`$TMPDIR`); when that is another filesystem than the run's (a local /tmp under a network `runs/`, a tmpfs),
    the final move is a copy into the target, and a kill during it leaves a truncated `last.ckpt` where the previous
    good one was. A rename within one folder is atomic, and the partial name matches neither `*.ckpt` nor
    `last*.ckpt`, so `--ckpt_path last` never picks up a half-written file. Remote paths (s3://...) keep Lightning's
    way.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        # Serialized in memory first, as Lightning does: torch.save into a file turns a failed write (a full disk)
        # into an opaque "unexpected pos" error; a plain write keeps the OSError and its errno.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            with open(partial, "wb") as file:
                file.write(buffer.getbuffer())
                file.flush()
                os.fsync(file.fileno())  # on disk before the rename, or a crashed node could leave an empty file
            os.replace(partial, path)
        except BaseException as err:
            partial.unlink(missing_ok=True)
            if is_disk_full(err):
                raise TrainingError(disk_full_message(path, err)) from err
            raise


def disk_full_message(path: Path, err: BaseException) -> str:
    last = path.parent / "last.ckpt"
    resume = f"resume with --ckpt_path {last}" if last.is_file() else "start again"
    return (
        f"no space left on the device to write {path} ({err}). The checkpoints already in {path.parent} are "
        f"complete; free some space (or point trainer.logger.init_args.save_dir at a larger disk) and {resume}"
    )
