"""The run's folder, `<save_dir>/<name>/version_N`: a new one is claimed atomically, and one a fit chose to write
into is locked while it runs.

Lightning's TensorBoardLogger numbers a new run by listing the folder (the highest `version_N` plus one) when it
first needs the number, so two fits of one config started at the same moment (two jobs of an array) took the same
number and wrote into each other's checkpoints, adapter and events. Creating the folder is the claim here: `mkdir`
fails for all but one process. And `--ckpt_path last` continues the newest run, which must not be one that another
fit is still writing: a fit holds a lock on the folder it chose (an advisory `flock`, released by the kernel however
the process ends).

Only rank 0 claims and locks; the other ranks take its folder from Lightning (checkpoint and log folders are
broadcast from rank 0).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import Any

from qlora_lit.errors import ConfigError

LOCK_NAME = ".qlora_lit.lock"
_locks: dict[Path, int] = {}  # folder -> the open file whose lock this process holds


def launched_as_rank_zero() -> bool:
    """Whether this process is rank 0 of its run as its launcher says, before any process group exists: torchrun
    sets RANK, srun SLURM_PROCID, Lightning LOCAL_RANK and NODE_RANK for the processes it starts (its own first
    process has none of them)."""
    return all(os.environ.get(key, "0") == "0" for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def take_new_run_folder(logger: Any) -> None:
    """For a logger (TensorBoardLogger, CSVLogger) that has no version yet: claim the next `version_N` folder of its
    save_dir and name and lock it, on rank 0. The number is set on the logger, not in the config, so the run's
    config.yaml still says `version: null` and can start other runs."""
    if getattr(logger, "_version", 0) is not None or not hasattr(logger, "root_dir"):
        return
    if not launched_as_rank_zero():
        return
    runs = Path(logger.root_dir)
    try:
        logger._version = claim_new_version(runs)
    except OSError:
        return  # an unwritable save_dir: the CLI says so before the model loads, naming the setting
    lock_run(runs / f"version_{logger._version}")


def claim_new_version(runs: Path) -> int:
    """Create the next free `version_N` folder in `runs` and return N; `mkdir` is atomic, so concurrent fits get
    different numbers."""
    runs.mkdir(parents=True, exist_ok=True)
    numbers = [entry.name.removeprefix("version_") for entry in runs.glob("version_*") if entry.is_dir()]
    version = max((int(number) for number in numbers if number.isdigit()), default=-1) + 1
    while True:
        try:
            (runs / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1


def lock_run(folder: Path) -> None:
    """Hold a lock on `folder` until `release_runs()` or the end of the process; refuse, naming the holder, a folder
    another running fit holds. On a filesystem without locks, go on unlocked."""
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 200).decode(errors="replace").strip() or "another process"
        os.close(descriptor)
        raise ConfigError(
            f"{folder} is being written by a fit that is still running ({holder}); two fits there would write into "
            "each other's checkpoints, adapter and events. Wait for it to end, give the checkpoint to continue "
            "(--ckpt_path FILE) with another trainer.logger.init_args.version, or leave --ckpt_path out"
        ) from None
    except OSError:  # no locks on this filesystem
        os.close(descriptor)
        return
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    _locks[folder] = descriptor


def release_runs() -> None:
    """Release every run folder this process locked (the end of a command; tests run several in one process)."""
    while _locks:
        os.close(_locks.popitem()[1])
