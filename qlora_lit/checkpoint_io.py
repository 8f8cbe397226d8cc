"""Checkpoint files that are either complete or absent, whatever kills the process and wherever the temp folder is;
and a file that is not a whole checkpoint (cut short, bytes changed, another kind of file) named with one message
before it is loaded."""

from __future__ import annotations

import functools
import io
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from qlora_lit.errors import ConfigError, TrainingError, is_disk_full


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

    def load_checkpoint(
        self, path: str | Path, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Lightning's load, after `check_checkpoint_file`; what torch or Lightning would raise for a file that is no
        training checkpoint becomes one message naming the file."""
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().load_checkpoint(path, map_location, weights_only)
        check_checkpoint_file(Path(path))
        try:
            checkpoint = super().load_checkpoint(path, map_location, weights_only)
        except pickle.UnpicklingError as err:
            raise ConfigError(unsafe_objects_message(path, err)) from None
        check_training_checkpoint(path, checkpoint)
        return checkpoint


def check_loads_safely(path: Path) -> None:
    """Refuse, with one message, a checkpoint that `torch.load(weights_only=True)` would refuse or that is no
    training checkpoint; reads its pickled part only (the tensors are mapped, not read)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(unsafe_objects_message(path, err)) from None
    check_training_checkpoint(path, checkpoint)


def unsafe_objects_message(path: str | Path, err: Exception) -> str:
    """torch's own message suggests weights_only=False, which is never the advice here."""
    found = re.search(r"GLOBAL (\S+)", str(err))
    return (
        f"{path} holds Python objects ({found.group(1) if found else 'not tensors or plain containers'}) that a "
        "checkpoint needs not hold and whose unpickling could run code, so qlora_lit does not load it; checkpoints "
        "written by qlora_lit hold tensors and plain containers only"
    )


def check_training_checkpoint(path: str | Path, checkpoint: Any) -> None:
    if not isinstance(checkpoint, dict) or not {"state_dict", "pytorch-lightning_version"} <= checkpoint.keys():
        keys = sorted(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConfigError(f"{path} was written by torch.save but is no training checkpoint (it holds {keys})")


ZIP_START = b"PK\x03\x04"  # torch.save writes zip archives; each entry carries a CRC-32 of its bytes


def check_checkpoint_file(path: Path) -> None:
    """Refuse, with one message naming `path`, a file that is no whole torch checkpoint: missing, a folder, another
    kind of file (text, an adapter's safetensors), or damaged: cut short (a copy or a write that did not finish), or
    with changed bytes (a disk or filesystem fault), which torch itself would load without a word, since it does not
    check the CRC-32 its zip entries carry. Reads the whole file once; a file checked before and unchanged since is
    not read again."""
    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"checkpoint {path} is a folder; give a .ckpt file (a run's checkpoints/*.ckpt) or `last`")
    stat = path.stat()
    _check_archive(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _check_archive(path: str, size: int, mtime_ns: int) -> None:
    with open(path, "rb") as file:
        head = file.read(16)
    if size == 0:
        raise ConfigError(f"checkpoint {path} is damaged: the file is empty")
    if not head.startswith(ZIP_START):
        raise ConfigError(f"{path} is not a checkpoint: {what_it_is(head)}")
    try:
        with zipfile.ZipFile(path) as archive:
            bad_entry = archive.testzip()
    except zipfile.BadZipFile as err:
        reason = "it is cut short (its zip archive has no end)" if "not a zip file" in str(err) else str(err)
        raise ConfigError(f"checkpoint {path} is damaged: {reason}") from None
    except (OSError, EOFError, ValueError) as err:  # a damaged header can make the zip reader fail in other ways
        raise ConfigError(f"checkpoint {path} is damaged: {err}") from None
    if bad_entry is not None:
        raise ConfigError(f"checkpoint {path} is damaged: the bytes of its entry {bad_entry} fail their checksum")


def what_it_is(head: bytes) -> str:
    """What a file that is no zip archive probably is, from its first bytes, and what to give instead."""
    if len(head) > 9 and head[8:10] == b'{"' and struct.unpack("<Q", head[:8])[0] < 100_000_000:
        return (
            "it is a safetensors file (an adapter's or a model's weights), not a training checkpoint; resuming "
            "takes a .ckpt file from a run's checkpoints/ folder"
        )
    return (
        "torch.save writes zip archives and this file is not one (if it was a checkpoint, it is damaged); give a "
        ".ckpt file from a run's checkpoints/ folder"
    )


def remove_partial_checkpoints(folder: Path) -> None:
    """Remove what a killed process left of checkpoint writes in `folder` (AtomicCheckpointIO's partial files)."""
    for partial in folder.glob(".*.ckpt.partial"):
        partial.unlink(missing_ok=True)


def disk_full_message(path: Path, err: BaseException) -> str:
    last = path.parent / "last.ckpt"
    resume = f"resume with --ckpt_path {last}" if last.is_file() else "start again"
    return (
        f"no space left on the device to write {path} ({err}). The checkpoints already in {path.parent} are "
        f"complete; free some space (or point trainer.logger.init_args.save_dir at a larger disk) and {resume}"
    )
