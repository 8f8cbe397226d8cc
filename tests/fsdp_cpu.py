"""Run the qlora_lit CLI under Lightning's FSDPStrategy on CPU processes (gloo), for tests.

    python tests/fsdp_cpu.py fit --config configs/demo.yaml --config configs/fsdp.yaml \
        --trainer.strategy.class_path fsdp_cpu.CPUFSDPStrategy --trainer.accelerator cpu --trainer.devices 2 ...

qlora_lit's strategy refuses CPUs (so does Lightning's FSDPStrategy), and Lightning hands torch's FSDP a device index
of None, which torch reads as "find an accelerator", and Lightning's FSDP precision autocasts CUDA tensors only. This
subclass wraps the module itself with `device_id=cpu`, autocasts on the CPU and leaves peft's input casts out as CUDA
autocast does (below); everything else (mixed precision, checkpoints, optimizer state, resuming) is qlora_lit's and
Lightning's own code.
"""

from __future__ import annotations

import sys

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from peft.tuners.lora import LoraLayer
from torch.distributed.fsdp import FullyShardedDataParallel

from qlora_lit.fsdp import QLoRAFSDPStrategy


class CPUFSDPPrecision(FSDPPrecision):
    def forward_context(self):
        if self.precision == "bf16-mixed":  # Lightning's autocasts CUDA tensors only
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return super().forward_context()


class CPUFSDPStrategy(QLoRAFSDPStrategy):
    def setup_environment(self) -> None:
        FSDPStrategy.setup_environment(self)  # QLoRAFSDPStrategy's own refuses CPUs
        self.precision_plugin = CPUFSDPPrecision(self.precision_plugin.precision)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                # peft casts a 4-bit layer's input to the LoRA weights' dtype unless CUDA autocast is on (it asks
                # torch.is_autocast_enabled(), which reads CUDA's). Under CPU autocast it would cast, to the sharded
                # fp32 weights in the forward pass but to the gathered bf16 ones when checkpointing recomputes it:
                # not how it runs on GPUs, and torch.utils.checkpoint refuses the changed dtype.
                layer.cast_input_dtype_enabled = False
        wrapped = FullyShardedDataParallel(
            model,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            cpu_offload=self.cpu_offload,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        return FSDPStrategy._setup_model(self, wrapped)  # already wrapped: Lightning only finishes the setup


if __name__ == "__main__":
    from qlora_lit.cli import cli_main

    cli_main(sys.argv[1:])
