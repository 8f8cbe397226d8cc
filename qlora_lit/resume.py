"""Resuming: `fit --ckpt_path last` continues the newest run of the config, not a new, empty version folder; and
what a resume may change (the user's settings win, except those that decide what the adapters are)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def newest_last_checkpoint(runs: Path) -> Path | None:
    """The `last.ckpt` saved most recently by any version of a run (`runs/<name>/<version>/checkpoints/`), counting
    Lightning's `last-v1.ckpt`, ... (written when a moved run folder resumes), among which `--ckpt_path last` takes
    the newest too."""
    found = [path for path in runs.glob("*/checkpoints/last*.ckpt") if path.is_file()]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def continue_newest_run(logger: Any) -> None:
    """For `--ckpt_path last`. Lightning looks for `last.ckpt` only in this run's own folder, and a logger without a
    fixed version starts a new folder (`version_N+1`): the resume found nothing and training began again at step 0,
    with one warning among many. So when the version is not fixed, take the version folder of the newest `last.ckpt`
    of this save_dir and name, and log into it (one TensorBoard run, as a requeued Slurm job has). With a fixed
    version (the Slurm scripts) only say when that folder has no checkpoint yet but another version does.

    `logger` is the parsed `trainer.logger` (class_path + init_args); other forms (none, a list) are left alone."""
    args = getattr(logger, "init_args", None)
    if args is None or "version" not in args or "save_dir" not in args:
        return
    runs = Path(args.save_dir) / (args.get("name") or "")
    newest = newest_last_checkpoint(runs)
    if args.version is None:
        if newest is None:
            rank_zero_warn(f"--ckpt_path last: no run in {runs} has a checkpoints/last.ckpt; training starts at step 0")
            return
        args.version = newest.parent.parent.name
        rank_zero_info(f"--ckpt_path last: continuing {newest.parent.parent} from {newest.name}")
        return
    version = args.version if isinstance(args.version, str) else f"version_{args.version}"
    own = runs / version / "checkpoints"
    if newest is not None and not any(own.glob("last*.ckpt")):
        rank_zero_warn(
            f"--ckpt_path last: {own} has no last.ckpt, so training starts at step 0 in {own.parent}; "
            f"to continue the newest earlier run instead, pass --ckpt_path {newest}"
        )


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
