"""What a checkpoint holds besides Lightning's own state, and the checks that it fits the model it is loaded into.

- The trained tensors only (`trained_tensors`): the frozen (4-bit) base stays out of every checkpoint.
- Every rank's random streams (`all_random_streams`, `restore_random_streams`): LoRA dropout draws from them, and
  ranks draw different amounts (their batches differ), so only each rank's own streams let a resumed run continue
  exactly as an uninterrupted one.
- Checks when one is loaded (`check_resume`, `check_adapter_tensors`): adapter-only checkpoints load with strict
  loading off, which would hide a checkpoint of another model or LoRA shape.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from qlora_lit.errors import ConfigError
from qlora_lit.fsdp import SHARDED_STATE_MESSAGE, SHARDS_KEY, unwrapped_name
from qlora_lit.resume import fixed_setting_changes

RANDOM_STREAMS_KEY = "torch_rng"


def trained_names(module: torch.nn.Module) -> set[str]:
    """Names of the trained tensors as state dicts spell them (FSDP's wrapper segments removed)."""
    return {unwrapped_name(name) for name, param in module.named_parameters() if param.requires_grad}


def trained_tensors(state: dict[str, torch.Tensor], names: set[str], prefix: str = "") -> dict[str, torch.Tensor]:
    """A state dict (keys under `prefix`) without the tensors that are not named in `names`."""
    keep = {prefix + name for name in names}
    return type(state)((key, value) for key, value in state.items() if key in keep)


def all_random_streams(world_size: int) -> list[dict[str, Any]]:
    """Every rank's torch random streams (CPU and CUDA), on every rank: each rank saves a checkpoint (Lightning's and
    ours alike). Generator states are tensors, so the checkpoint still loads with weights_only=True."""
    local = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if world_size == 1:
        return [local]
    ranks = [None] * world_size
    torch.distributed.all_gather_object(ranks, local)
    return ranks


def restore_random_streams(saved: list[dict] | dict, rank: int, world_size: int) -> None:
    """This rank's saved streams; rank 0's when the run resumes on another number of processes (close, not exact:
    the other ranks' dropout masks then differ from an uninterrupted run's)."""
    ranks = [saved] if isinstance(saved, dict) else saved  # earlier checkpoints held one rank's streams
    state = ranks[rank] if len(ranks) == world_size else ranks[0]
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_resume(checkpoint: dict[str, Any], hparams: dict[str, Any], model_name: str, fitting: bool):
    """Whether `checkpoint` may continue a run with these settings (`hparams`): a warning when it was trained on
    another model name (the same model at another path is fine: the tensors' shapes are checked next); an error when a
    setting that decides what the adapters are changed (resume.FIXED_ON_RESUME), or when a `fitting` run would resume
    optimizer state that an earlier qlora_lit saved in FSDP shards."""
    saved = checkpoint.get("hyper_parameters", {})
    trained_on = saved.get("model_name_or_path")
    if trained_on and trained_on != model_name:
        rank_zero_warn(
            f"resuming a checkpoint trained on {trained_on!r} with model_name_or_path={model_name!r}"
            " (fine if it is the same model at another path; the adapter shapes are checked next)"
        )
    changed = fixed_setting_changes(saved, hparams)
    if changed:
        raise ConfigError(
            "resuming this checkpoint cannot change what its adapters are: "
            + "; ".join(f"{key} was {before!r}, now {now!r}" for key, before, now in changed)
            + ". Resume with the checkpoint's values, or start a new run (leave --ckpt_path out)"
        )
    if fitting and any(SHARDS_KEY in state for state in checkpoint.get("optimizer_states", [])):
        raise ConfigError(SHARDED_STATE_MESSAGE)


def check_adapter_tensors(saved: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    """Every trained tensor of `module` is in `saved` (a checkpoint's state dict), of its shape, and `saved` holds
    nothing the module lacks (under FSDP too: the trained tensors are whole on every rank)."""
    params = {unwrapped_name(name): param for name, param in module.named_parameters()}
    trained = trained_names(module)
    missing = sorted(trained - saved.keys())
    compared = trained & saved.keys()
    wrong_shape = [key for key in compared if saved[key].shape != params[key].shape]
    unexpected = sorted(saved.keys() - params.keys())
    if missing or wrong_shape or unexpected:
        raise ConfigError(
            "the checkpoint does not match this model's adapters (another model or LoRA setting?): "
            f"{len(missing)} missing, e.g. {missing[:3]}; {len(wrong_shape)} of another shape, e.g. "
            f"{wrong_shape[:3]}; {len(unexpected)} unknown, e.g. {unexpected[:3]}"
        )
