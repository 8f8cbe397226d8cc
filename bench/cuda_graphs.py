"""CUDA graphs over the compiled decoder layers (an experiment of issue 20, the `*-graphs` variants of
bench/run_qlora_lit.py): the host's kernel launches bound base.yaml's one-row micro-batches (docs/PERFORMANCE.md),
and a CUDA graph replays a layer's kernels with one launch.

A graph is recorded for fixed shapes, so every micro-batch here has the same ones: rows padded to the pack length
(the padding is a segment of its own, as PackingCollator makes it), the examples' start offsets padded to a fixed
count with empty examples at the end, and the pack length passed as the longest example (an upper bound, which
FlashAttention's varlen kernel takes). The losses and gradients are those of the unpadded batch
(tests/test_bench_cuda_graphs.py, on CPUs, where no graph is recorded).

A graph's outputs live in memory the next replay writes again. A gradient that autograd takes over as a parameter's
`.grad` (it does, for the first gradient of a parameter whose `.grad` is None) would be such memory, and the next
micro-batch's backward would overwrite it before adding to it: accumulated gradients come out wrong without an error
(pytorch/pytorch#96693). So the parameters' gradients are allocated once, zeroed rather than freed between steps, and
every backward adds into them.
"""

from __future__ import annotations

from functools import partial

import lightning as L
import torch

from qlora_lit import attention
from qlora_lit.model import COMPILE_OPTIONS, compile_decoder_layers, decoder_layers


class StaticShapes:
    """Wraps a packing collator whose rows are already padded to `width`: adds the start offsets, padded to
    `offsets` entries, and `width` as the longest example."""

    def __init__(self, inner, width: int, offsets: int) -> None:
        self.inner, self.width, self.offsets = inner, width, offsets

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.inner(rows)
        if batch["input_ids"].numel() != self.width * len(rows):
            raise ValueError(f"rows of {batch['input_ids'].shape[1]} tokens, not {self.width}: pad them to it")
        cu = attention.sequence_starts(batch["position_ids"])["cu_seq_lens_q"]
        if len(cu) > self.offsets:
            raise ValueError(f"{len(cu) - 1} examples in a micro-batch, more than the {self.offsets - 1} planned")
        cu = torch.cat([cu, cu[-1:].expand(self.offsets - len(cu))])
        return {
            **batch,
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": self.width,
            "max_length_k": self.width,
        }


class KeptGradients(L.Callback):
    """Gradients allocated before the first backward and zeroed, not freed, by the optimizer: every backward adds into
    the same tensors, which autograd never takes over from a graph's outputs."""

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        for param in module.parameters():
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)
        for optimizer in trainer.optimizers:
            optimizer.zero_grad = partial(type(optimizer).zero_grad, optimizer, set_to_none=False)


def graph_decoder_layers(model) -> None:
    """Compile the decoder layers for fixed shapes with Inductor's CUDA graphs."""
    compile_decoder_layers(model)  # qlora_lit's settings and cache folder; then again, static and graphed
    for layer in decoder_layers(model):
        layer.compile(dynamic=False, options={**COMPILE_OPTIONS, "triton.cudagraphs": True})


class CudaGraphLayers(KeptGradients):
    """Compiles the decoder layers for fixed shapes with Inductor's CUDA graphs, once the model is built."""

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        graph_decoder_layers(module.model)

    def on_train_batch_start(self, *args) -> None:
        torch.compiler.cudagraph_mark_step_begin()  # the graphs' outputs of the last micro-batch may be reused
