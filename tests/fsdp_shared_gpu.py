"""Run configs/fsdp.yaml on a machine with one GPU: two ranks share it and talk over gloo (NCCL refuses two ranks on
one GPU). The CUDA paths (bitsandbytes' CUDA kernels, CUDA autocast in bf16, FSDP's flat parameters on the GPU,
gathered checkpoints, the adapter export, samples with synced generation) run as on several GPUs; the collectives
go through host memory instead of NVLink (FSDP_SHARED_GATHER=shared: the base's all-gathers through GPU memory the
ranks share, tests/shared_gather.py). Not a speed measurement.

    python tests/fsdp_shared_gpu.py check OUT_DIR [--model.model_name_or_path PATH ...]

`check` runs three fits of the demo config with fsdp.yaml on two ranks: 6 steps; the same resumed from its step-3
checkpoint; 4 steps with gradient checkpointing. It prints one JSON line: what the checkpoints hold, how far the
resumed run's adapters are from the uninterrupted run's, and whether the exported adapter equals the checkpoint.
`fit ...` is the CLI with the strategy below (what `check` runs).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from runs import ROOT, checkpoint_at, fit_in_subprocess, peft_key
from shared_gather import SharedMemoryGather

from qlora_lit.fsdp import QLoRAFSDPStrategy

CAP_VARIABLE = "FSDP_RANK_CAP_GIB"
GATHER_VARIABLE = "FSDP_SHARED_GATHER"  # "shared": tests/shared_gather.py; else gloo's


class SharedGPUFSDPStrategy(QLoRAFSDPStrategy):
    """qlora_lit's FSDP strategy with two processes (FSDP_SHARED_RANKS: more) on cuda:0, over gloo. With
    FSDP_RANK_CAP_GIB set, each process's allocator is capped at that many GiB (as if each rank had a GPU of that
    size); each rank prints its peak."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["process_group_backend"] = "gloo"
        kwargs["parallel_devices"] = [torch.device("cuda", 0)] * int(os.environ.get("FSDP_SHARED_RANKS", "2"))
        super().__init__(*args, **kwargs)

    gather: SharedMemoryGather | None = None

    def setup_environment(self) -> None:
        super().setup_environment()
        self.cap_to(0)
        if os.environ.get(GATHER_VARIABLE) == "shared":  # the base's all-gathers through shared GPU memory, not gloo
            self.gather = SharedMemoryGather(self.root_device, on_grow=self.cap_to)
            self.gather.install()

    def cap_to(self, extra_bytes: int) -> None:
        """Cap this process's allocator at FSDP_RANK_CAP_GIB plus the shared gather's buffer (which NCCL would not
        take from torch's allocator)."""
        cap = os.environ.get(CAP_VARIABLE)
        if cap:
            total = torch.cuda.get_device_properties(self.root_device).total_memory
            fraction = (float(cap) * 2**30 + extra_bytes) / total
            torch.cuda.set_per_process_memory_fraction(fraction, self.root_device)

    def gib_without_gather(self, nbytes: int) -> float:
        """GiB of the rank's GPU memory, the shared gather's buffer left out (counted beside the cap, not in it)."""
        return (nbytes - (self.gather.extra_bytes if self.gather is not None else 0)) / 2**30

    def setup(self, trainer) -> None:
        super().setup(trainer)
        held = self.gib_without_gather(torch.cuda.memory_allocated(self.root_device))
        peak = self.gib_without_gather(torch.cuda.max_memory_allocated(self.root_device))
        print(f"rank {self.global_rank} loaded: allocated_gib {held:.3f} load_peak_gib {peak:.3f}", flush=True)

    def teardown(self) -> None:
        extra = self.gather.extra_bytes if self.gather is not None else 0
        peak = self.gib_without_gather(torch.cuda.max_memory_allocated(self.root_device))
        reserved = self.gib_without_gather(torch.cuda.max_memory_reserved(self.root_device))
        host = torch.cuda.host_memory_stats()  # CPU memory pinned by torch (cpu_offload: the shards, their buffers)
        pinned = max((v for k, v in host.items() if k.startswith("allocated_bytes") and k.endswith("peak")), default=0)
        pinned /= 2**30
        print(
            f"rank {self.global_rank} peak_allocated_gib {peak:.3f} peak_reserved_gib {reserved:.3f} "
            f"peak_pinned_gib {pinned:.3f} gather_buffer_gib {extra / 2**30:.3f}",
            flush=True,
        )
        if self.gather is not None:
            self.gather.uninstall()
        super().teardown()


def fit(folder: Path, *args: str) -> Path:
    """The demo config with fsdp.yaml on two ranks sharing cuda:0 (its output in folder/log.txt); the run folder."""
    shared = ["--config", str(ROOT / "configs" / "fsdp.yaml")]
    shared += ["--trainer.strategy.class_path", "fsdp_shared_gpu.SharedGPUFSDPStrategy"]
    shared += ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--model.quantization.compute_dtype"]
    shared += ["bfloat16", "--trainer.val_check_interval", "3", "--data.batch_size", "4"]
    shared += ["--samples.max_new_tokens", "4"]
    return fit_in_subprocess(folder, *shared, *args, entry=(__file__,), timeout=1200)


def check(out: Path, extra: list[str]) -> None:
    from safetensors.torch import load_file

    full = fit(out / "full", "--trainer.max_steps", "6", *extra)
    final = checkpoint_at(full, 6)["state_dict"]
    ckpt = next((full / "checkpoints").glob("step000003-*.ckpt"))
    resumed = checkpoint_at(fit(out / "resumed", "--trainer.max_steps", "6", "--ckpt_path", str(ckpt), *extra), 6)
    try:
        gc = fit(out / "gc", "--trainer.max_steps", "4", "--model.gradient_checkpointing", "true", *extra)
        gc_steps = sorted(int(p.name[4:10]) for p in (gc / "checkpoints").glob("step*.ckpt"))
    except RuntimeError as failed:
        gc_steps = str(failed)[-600:]
    exported = load_file(full / "adapter" / "adapter_model.safetensors")
    moved = max((final[k] - checkpoint_at(full, 3)["state_dict"][k]).abs().max().item() for k in final)
    report = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "adapter_tensors": len(final),
        "dtypes": sorted({str(v.dtype) for v in final.values()}),
        "exported_equals_checkpoint": all(torch.equal(exported[peft_key(k)], v) for k, v in final.items()),
        "optimizer_states": len(checkpoint_at(full, 6)["optimizer_states"][0]["state"]),
        "resumed_max_abs_diff": max((resumed["state_dict"][k] - v).abs().max().item() for k, v in final.items()),
        "moved_steps_4_to_6_max_abs": moved,
        "gradient_checkpointing_run": gc_steps,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["check"]:
        if len(sys.argv) < 3:
            raise SystemExit("usage: python tests/fsdp_shared_gpu.py check OUT_DIR [CLI overrides...]")
        check(Path(sys.argv[2]).resolve(), sys.argv[3:])
    else:
        from qlora_lit.cli import cli_main

        cli_main(sys.argv[1:])
