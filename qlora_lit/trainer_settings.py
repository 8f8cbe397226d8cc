"""Trainer settings that cannot work, refused with one message before Lightning builds the trainer.

Lightning lets `accumulate_grad_batches < 1` through (0 crashes in the sampler, a negative value trains nothing
forever) and reports impossible device counts with a traceback, some unclearly ("No supported gpu backend found!").
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.accelerators import cuda

from qlora_lit.data.mixing import parse_sources, source_names
from qlora_lit.errors import ConfigError

GPU_ACCELERATORS = ("gpu", "cuda")


def check_trainer_settings(accelerator: Any, devices: Any, num_nodes: int, accumulate_grad_batches: Any) -> None:
    if not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
        raise ConfigError(
            "trainer.accumulate_grad_batches must be a whole number >= 1 (micro-batches per optimizer step), "
            f"got {accumulate_grad_batches!r}"
        )
    if num_nodes < 1:
        raise ConfigError(f"trainer.num_nodes must be >= 1, got {num_nodes}")
    count = requested_devices(devices)
    if count is not None and (count == 0 or count < -1):
        raise ConfigError(f"trainer.devices must be >= 1, -1 (every GPU) or auto, got {devices}")
    available = cuda.num_cuda_devices()
    if count == -1 and available == 0:
        raise ConfigError("trainer.devices=-1 means every GPU and there is none here; give a number of processes")
    if str(accelerator) not in GPU_ACCELERATORS:
        return
    if available == 0:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible here (check the driver, "
            "CUDA_VISIBLE_DEVICES and that torch was built with CUDA); on a CPU use trainer.accelerator=cpu "
            "(configs/demo.yaml)"
        )
    if count is not None and count > available:
        raise ConfigError(
            f"trainer.devices={count} but this machine has {available} GPU{'s' if available > 1 else ''}: "
            f"use trainer.devices {available} or fewer (-1 takes them all)"
        )


def requested_devices(devices: Any) -> int | None:
    """How many devices `trainer.devices` asks for: a count, -1 (all), or None when Lightning decides (auto, a list
    or string of GPU ids)."""
    if isinstance(devices, int):
        return devices
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        return int(devices)
    return None


# What a fit logs at every validation (QLoRAModule), so ModelCheckpoint finds it whenever it saves: the metrics
# checkpoint.monitor can watch, with `val_loss/<source>` for each of several data sources. TrainingMonitor's series
# (train/grad_norm, throughput/*, memory/*) are logged every trainer.log_every_n_steps optimizer steps only, some on
# GPUs only: a validation before the first log stopped the run at its checkpoint (Lightning's "could not find the
# monitored key").
MONITORABLE = ("val_loss", "val_ppl", "train_loss")
WINDOW_SERIES = ("train/", "throughput/", "memory/")


def check_run_settings(
    val_check_interval: Any, save_top_k: Any, monitor: Any, data_path: Any = None, accumulate: Any = 1
) -> None:
    """Validation and checkpoint settings that would fail only later: Lightning divides by a validation interval of
    0, refuses a save_top_k below -1 with a traceback, and finds a misspelt monitor, or one not logged at every
    validation, only at a checkpoint, after the model loaded and trained. `data_path`: data.path, which names the
    sources of `val_loss/<source>`."""
    if isinstance(val_check_interval, (int, float)) and val_check_interval <= 0:
        raise ConfigError(
            f"trainer.val_check_interval must be > 0 (training batches between validations, or a fraction of an "
            f"epoch), got {val_check_interval}"
        )
    check_validation_at_step_boundaries(val_check_interval, accumulate)
    if isinstance(save_top_k, int) and save_top_k < -1:
        raise ConfigError(f"checkpoint.save_top_k must be -1 (keep all), 0 (none) or more, got {save_top_k}")
    if monitor is None and isinstance(save_top_k, int) and save_top_k > 1:  # Lightning: a traceback
        raise ConfigError(
            f"checkpoint.save_top_k={save_top_k} keeps the best checkpoints by checkpoint.monitor, which is null: name "
            f"a metric ({', '.join(MONITORABLE[:2])}, ...), or keep the newest (save_top_k 1) or all (-1)"
        )
    if monitor is not None:
        check_monitor(monitor, data_path)


def check_validation_at_step_boundaries(val_check_interval: Any, accumulate: Any) -> None:
    """A validation inside an optimizer step (after some of its accumulated micro-batches) saves checkpoints without
    the gradients accumulated so far: a run resumed from one finishes that step without them (adapters 0.003-0.014
    apart from the uninterrupted run's on the demo). Validations must fall where optimizer steps end."""
    if not isinstance(accumulate, int) or accumulate <= 1 or isinstance(val_check_interval, bool):
        return
    if isinstance(val_check_interval, int) and val_check_interval % accumulate:
        below = val_check_interval - val_check_interval % accumulate
        raise ConfigError(
            f"trainer.val_check_interval={val_check_interval} training batches is not a multiple of "
            f"trainer.accumulate_grad_batches={accumulate}: its validations (and their checkpoints) would fall inside "
            "an optimizer step, whose accumulated gradients no checkpoint keeps, so a resumed run would differ. Use "
            f"{below or accumulate} or {below + accumulate} (optimizer steps x {accumulate})"
        )
    if isinstance(val_check_interval, float) and val_check_interval < 1:
        raise ConfigError(
            f"trainer.val_check_interval={val_check_interval} (a fraction of an epoch) with "
            f"trainer.accumulate_grad_batches={accumulate} puts validations (and their checkpoints) inside optimizer "
            "steps, whose accumulated gradients no checkpoint keeps: give it in training batches, a multiple of "
            f"{accumulate}"
        )


def check_monitor(monitor: str, data_path: Any) -> None:
    if monitor in MONITORABLE:
        return
    names = source_names(parse_sources(data_path)) if data_path else []
    per_source = [f"val_loss/{name}" for name in names] if len(names) > 1 else []
    if monitor in per_source:
        return
    why = "is not a metric this run logs at every validation"
    if monitor.startswith(WINDOW_SERIES):
        why = (
            "is logged only every trainer.log_every_n_steps optimizer steps (throughput/mfu only where the GPU's peak "
            "is known, memory/* only on GPUs), so a validation can come before it and its checkpoint finds no value"
        )
    choices = [*MONITORABLE, *(per_source or ["val_loss/<source> (with several data.path entries)"])]
    raise ConfigError(f"checkpoint.monitor {monitor!r} {why}; choose one of {', '.join(choices)}")
