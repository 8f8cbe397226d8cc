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

from qlora_lit.model import COMPILE_OPTIONS, compile_decoder_layers, decoder_layers


class StaticShapes:
    """Wraps a packing collator whose rows are already padded to `width`: adds the start offsets, padded to
    `offsets` entries, and `longest` (default: `width`) as the longest example.

    FlashAttention's varlen kernel starts a block of threads per `longest`-sized slice of every example, padded ones
    included, so a bound far above the real examples (a 2048-token row of examples of at most 512 tokens) mostly starts
    blocks with nothing to do. With `longest` set, the row's padding (its last segment) is cut into segments of at most
    that length; an example longer than it is refused."""

    def __init__(self, inner, width: int, offsets: int, longest: int | None = None) -> None:
        self.inner, self.width, self.offsets, self.longest = inner, width, offsets, longest or width

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.inner(rows)
        if batch["input_ids"].numel() != self.width * len(rows):
            raise ValueError(f"rows of {batch['input_ids'].shape[1]} tokens, not {self.width}: pad them to it")
        starts = []
        for index, row in enumerate(rows):
            base, used = index * self.width, len(row["position_ids"])
            examples = [i for i, position in enumerate(row["position_ids"]) if position == 0]
            bounds = [*examples, used]
            longest = max(end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True))
            if longest > self.longest:
                raise ValueError(f"an example of {longest} tokens, longer than the {self.longest} planned")
            starts += [base + i for i in examples] + [base + i for i in range(used, self.width, self.longest)]
        cu = torch.tensor([*starts, self.width * len(rows)], dtype=torch.int32)
        if len(cu) > self.offsets:
            raise ValueError(f"{len(cu) - 1} examples in a micro-batch, more than the {self.offsets - 1} planned")
        cu = torch.cat([cu, cu[-1:].expand(self.offsets - len(cu))])
        return {
            **batch,
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": self.longest,
            "max_length_k": self.longest,
        }


def allocate_gradients(module: torch.nn.Module) -> None:
    """Zeroed gradients for every trainable parameter that has none yet, for backward passes to add into."""
    for param in module.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)


class KeptGradients(L.Callback):
    """Gradients allocated before the first backward and zeroed, not freed, by the optimizer: every backward adds into
    the same tensors, which autograd never takes over from a graph's outputs."""

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        allocate_gradients(module)
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
