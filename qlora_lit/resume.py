"""Resuming: `fit --ckpt_path last` continues the newest run of the config, not a new, empty version folder, from
its newest whole checkpoint; and what a resume may change (the user's settings win, except those that decide what the
adapters are)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from tensorboard.compat.proto.event_pb2 import Event, SessionLog

from qlora_lit.checkpoint_io import check_checkpoint_file, check_loads_safely, remove_partial_checkpoints
from qlora_lit.errors import ConfigError
from qlora_lit.run_folder import launched_as_rank_zero, lock_run


def newest_last_checkpoint(runs: Path) -> Path | None:
    """The `last.ckpt` saved most recently by any version of a run (`runs/<name>/<version>/checkpoints/`), counting
    Lightning's `last-v1.ckpt`, ... (written when a moved run folder resumes), among which `--ckpt_path last` takes
    the newest too."""
    found = [path for path in runs.glob("*/checkpoints/last*.ckpt") if path.is_file()]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def continue_newest_run(logger: Any, ckpt_path: str = "last") -> None:
    """For `--ckpt_path last` (and `best`). Lightning looks for `last.ckpt` only in this run's own folder, and a logger
    without a fixed version starts a new folder (`version_N+1`): the resume found nothing and training began again at
    step 0, with one warning among many. So when the version is not fixed, take the version folder of the newest
    `last.ckpt` of this save_dir and name, and log into it (one TensorBoard run, as a requeued Slurm job has); rank 0
    locks it, so a fit that is still writing it is not continued twice (qlora_lit.run_folder). With a fixed version
    (the Slurm scripts: one folder per job) only say when that folder has no checkpoint yet but another version does.

    `logger` is the parsed `trainer.logger` (class_path + init_args); other forms (none, a list) are left alone."""
    args = getattr(logger, "init_args", None)
    if args is None or "version" not in args or "save_dir" not in args:
        return
    runs = Path(args.save_dir) / (args.get("name") or "")
    newest = newest_last_checkpoint(runs)
    if args.version is None:
        if newest is None:
            if ckpt_path == "last":
                rank_zero_warn(f"--ckpt_path last: no run in {runs} has a checkpoints/last.ckpt; starting at step 0")
            return
        if launched_as_rank_zero():
            lock_run(newest.parent.parent)
        args.version = newest.parent.parent.name
        rank_zero_info(f"--ckpt_path {ckpt_path}: continuing {newest.parent.parent}")
        return
    own = fixed_run_folder(args) / "checkpoints"
    if newest is not None and not any(own.glob("last*.ckpt")):
        rank_zero_warn(
            f"--ckpt_path {ckpt_path}: {own} has no last.ckpt, so training starts at step 0 in {own.parent}; "
            f"to continue the newest earlier run instead, pass --ckpt_path {newest}"
        )


def refuse_a_used_run_folder(logger: Any, default_root_dir: str | None = None) -> None:
    """For `fit` without `--ckpt_path`: a fixed version whose folder already holds a run (a checkpoint, an adapter)
    would train from step 0 in it, overwrite its adapter, config.yaml and data_stats.json, mix its checkpoints with
    the new ones (last-v1.ckpt, ...) and hide its TensorBoard curves behind the new run's restart. Refused before
    anything is written; a folder a killed fit left without a checkpoint or adapter is reused. Without a logger the
    run's folder is trainer.default_root_dir (the current folder unless set), fixed too."""
    args = getattr(logger, "init_args", None)
    if no_logger(logger):
        folder, setting = Path(default_root_dir or "."), "trainer.default_root_dir"
    elif args is not None and args.get("version") is not None and "save_dir" in args:
        folder, setting = fixed_run_folder(args), "trainer.logger.init_args.version"
    else:
        return
    if any((folder / "checkpoints").glob("*.ckpt")) or (folder / "adapter").is_dir():
        raise ConfigError(
            f"{folder} already holds a run: continue it with --ckpt_path last, or choose another {setting}"
        )


def no_logger(logger: Any) -> bool:
    """Whether trainer.logger turns logging off (false, or an empty list); null is Lightning's default logger."""
    return logger is False or (isinstance(logger, list) and not logger)


def fixed_run_folder(args: Any) -> Path:
    """The folder of a logger's fixed version (`init_args` of trainer.logger): a number is Lightning's version_N."""
    version = args.version if isinstance(args.version, str) else f"version_{args.version}"
    return Path(args.save_dir) / (args.get("name") or "") / version


def checkpoint_to_resume(
    ckpt_path: str | None, folder: Path, monitor: str | None, weights_only: bool = True
) -> str | None:
    """What `--ckpt_path` names, checked before anything loads: `last` is the newest whole checkpoint in the run's
    checkpoint `folder` (None when there is none), `best` the one its ModelCheckpoint ranked best by `monitor`, and a
    path is refused with one message unless it is a whole checkpoint (and, with `weights_only`, one that loads with
    `torch.load(weights_only=True)`). Lightning's other values (`hpc`) and remote paths are left to Lightning."""
    if ckpt_path == "last":
        path = newest_whole_checkpoint(folder)
    elif ckpt_path == "best":
        path = best_checkpoint(folder, monitor)
    elif ckpt_path is None or ckpt_path == "hpc" or not isinstance(get_filesystem(ckpt_path), LocalFileSystem):
        return ckpt_path
    else:
        path = Path(ckpt_path)
    if path is None:
        return None
    try:
        check_checkpoint_file(path)
        if weights_only:
            check_loads_safely(path)
    except ConfigError as err:
        raise ConfigError(f"--ckpt_path: {err}") from None
    return str(path) if ckpt_path in ("last", "best") else ckpt_path


def newest_whole_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint file in `folder` that is whole. A damaged one (cut short, bytes changed by a disk fault)
    is named and passed over for the next newest: `last.ckpt`, then the top-k checkpoints, the newest first."""
    candidates = sorted(folder.glob("*.ckpt"), key=lambda path: path.stat().st_mtime, reverse=True)
    damaged = []
    for path in candidates:
        try:
            check_checkpoint_file(path)
        except ConfigError as err:
            damaged.append(str(err))
            continue
        if damaged:
            rank_zero_warn(f"--ckpt_path last: {'; '.join(damaged)}. Resuming from {path}, the newest whole one")
        return path
    if damaged:
        raise ConfigError(
            f"--ckpt_path last: no checkpoint in {folder} is whole: {'; '.join(damaged)}. Start a new run (leave "
            "--ckpt_path out) or give a checkpoint from elsewhere"
        )
    return None


def best_checkpoint(folder: Path, monitor: str | None) -> Path:
    """The checkpoint with the best `monitor` value, as the newest whole checkpoint's ModelCheckpoint state records
    it (Lightning knows the best only within the process that saved it, and said "not configured to save the best
    model" to every later one)."""
    if monitor is None:
        raise ConfigError(
            "--ckpt_path best means the checkpoint with the best checkpoint.monitor value, and checkpoint.monitor is "
            "null, so no checkpoint is ranked: give --ckpt_path last or a checkpoint file"
        )
    newest = newest_whole_checkpoint(folder)
    if newest is None:
        raise ConfigError(f"--ckpt_path best: {folder} holds no checkpoint; give --ckpt_path a checkpoint file")
    states = torch.load(newest, map_location="cpu", weights_only=True, mmap=True).get("callbacks", {})
    recorded = [
        state.get("best_model_path")
        for key, state in states.items()
        if key.startswith("ModelCheckpoint") and state.get("monitor") == monitor and state.get("best_model_path")
    ]
    if not recorded:
        raise ConfigError(
            f"--ckpt_path best: the checkpoints in {folder} rank none by {monitor!r} (they were saved with another "
            "checkpoint.monitor); give a checkpoint file"
        )
    best = Path(recorded[0])
    best = best if best.is_file() else folder / best.name  # the run folder may have moved since
    try:
        check_checkpoint_file(best)
    except ConfigError as err:
        raise ConfigError(f"--ckpt_path best: {err}") from None
    rank_zero_info(f"--ckpt_path best: {best} (best {monitor})")
    return best


class ResumedRun(Callback):
    """A fit that continues a run in its own folder, after a kill or a requeue, leaves it as an uninterrupted run
    would: the checkpoint files a killed process left half-written are removed (`.<name>.ckpt.partial`, which no
    later save of that name may replace), and TensorBoard's series go on from the step this process starts from
    without the points a killed process logged after its checkpoint (they are logged again): a `SessionLog.START`
    event at that step, the first this process writes, tells TensorBoard to drop every earlier-written event from it
    on, as `SummaryWriter(purge_step=...)` does. Lightning logs optimizer step k's metrics, and a validation after
    it, at step k - 1, so what a run logged before a checkpoint of step k is at smaller steps. A run that starts at
    step 0 in a folder it reuses (a requeued Slurm job killed before its first checkpoint) drops it all."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        callback = trainer.checkpoint_callback
        if callback is not None and callback.dirpath:
            remove_partial_checkpoints(Path(callback.dirpath))
        restart = Event(step=restored_step(trainer.ckpt_path), session_log=SessionLog(status=SessionLog.START))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.file_writer.add_event(restart)
                logger.experiment.flush()


def restored_step(ckpt_path: str | None) -> int:
    """The optimizer step of the checkpoint a fit starts from (read before Lightning restores it), or 0."""
    if not ckpt_path or not isinstance(get_filesystem(ckpt_path), LocalFileSystem):
        return 0
    return torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0)


# Settings that decide what the trained adapters are (their shapes, what they adapt, the base they sit on): a resume
# that changed one would continue another model. Everything else (learning rate, schedule, max_steps, data, logging,
# dropout, compute dtype) is the user's to change on resume.
FIXED_ON_RESUME = {
    "lora": ("r", "alpha", "target_modules", "bias", "modules_to_save"),
    "quantization": ("load_in_4bit", "load_in_8bit", "quant_type", "double_quant"),
}


def fixed_setting_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, current value) for each FIXED_ON_RESUME setting that differs; checkpoints saved
    without hyperparameters compare as equal."""
    changes = []
    for group, keys in FIXED_ON_RESUME.items():
        before, after = saved.get(group) or {}, now.get(group) or {}
        for key in keys:
            if key in before and key in after and _canonical(before[key]) != _canonical(after[key]):
                changes.append((f"model.{group}.{key}", before[key], after[key]))
    return changes


def _canonical(value: Any) -> Any:
    """Lists of module names compare as sets (order does not matter to peft); tuples as lists."""
    if isinstance(value, (list, tuple, set)):
        return sorted(map(str, value))
    return value
