"""CUDA graphs of every decoder layer's forward and backward pass, recorded with torch's
`make_graphed_callables` (an experiment of issue 20: the `*-lgraphs` variants of bench/run_qlora_lit.py).

base.yaml's step on the 1B model is bound by the host: one 2048-token row per optimizer step keeps the GPU busy
for about 35 ms while the host launches some 2,300 kernels, most of them in the decoder layers (call h's profile,
docs/PERFORMANCE.md). Inductor's own CUDA graphs (bench/cuda_graphs.py) record each compiled graph through torch's
CUDA-graph trees, which stopped in a backward on the GPU (calls g, h). `make_graphed_callables` is the plainer
mechanism: for each layer one graph of its forward and one of its backward, recorded once, in the order they run,
in one memory pool; a replay is one launch, and the layer's trainable parameters get their gradients through an
autograd function as before. The layers may be compiled (the graphs then hold Inductor's kernels).

A graph holds fixed shapes and fixed non-tensor arguments. `LayerGraphs` records each layer's call (its tensors'
shapes, dtypes and whether they need gradients, and every other argument) during one micro-batch, records the graphs
from those calls after it, and from then on replays a layer's graphs for a call that matches its record and calls
the layer as before for any other (counted: `replays`, `misses`). Fixed shapes come from bench/cuda_graphs.py's
`StaticShapes`. A replay writes its outputs, gradients included, into the same memory every time, so gradients must
be added into tensors of their own (`KeptGradients`).
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager, nullcontext
from functools import partial

import lightning as L
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from bench.cuda_graphs import KeptGradients
from qlora_lit.model import decoder_layers

TENSOR = object()  # where a call's tensors go among its fixed arguments


def describe(value):
    """What a call must repeat for a graph to stand in for it: a tensor's layout, any other argument itself."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype, value.device, value.requires_grad)
    return value


class LayerCall(torch.nn.Module):
    """A layer called with new tensors in place of a recorded call's, its other arguments as recorded. The layer is a
    submodule, so its parameters are among the graph's inputs and get their gradients."""

    def __init__(self, layer: torch.nn.Module, call, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.layer, self.call = layer, call
        leaves, self.spec = tree_flatten((args, kwargs))
        self.fixed = [TENSOR if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        self.described = [describe(leaf) for leaf in leaves]
        self.sample = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]  # until the graphs are recorded

    def matches(self, leaves: list, spec) -> bool:
        return spec == self.spec and all(
            d == describe(leaf) if isinstance(leaf, torch.Tensor) else d is leaf or d == leaf
            for d, leaf in zip(self.described, leaves, strict=True)
        )

    def arguments(self, *tensors: torch.Tensor) -> tuple[tuple, dict]:
        """The recorded call's arguments with these tensors in place of its own."""
        given = iter(tensors)
        return tree_unflatten([next(given) if f is TENSOR else f for f in self.fixed], self.spec)

    def forward(self, *tensors: torch.Tensor):
        args, kwargs = self.arguments(*tensors)
        return self.call(*args, **kwargs)


class LayerGraphs:
    """Intercepts every decoder layer's call (the module's compiled-call slot, so the model's structure and parameter
    names stay as they are); `record()`, then `capture()`, then matching calls replay the graphs."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = decoder_layers(model)
        self.calls: list = [None] * len(self.layers)
        self.graphed: list | None = None
        self.statics: list[tuple] = []  # each layer's graph inputs (make_graphed_callables keeps the samples)
        self.shared: list[list[bool]] = []  # which of them other layers' graphs read too (rotary tables, offsets)
        self.filled: dict[int, torch.Tensor] = {}  # a shared input's id -> the tensor last copied into it
        self.recording = False
        self.replays = self.misses = 0
        self.originals = []
        for index, layer in enumerate(self.layers):
            original = layer._compiled_call_impl or layer._call_impl  # compiled by qlora_lit, or not
            self.originals.append(original)
            layer._compiled_call_impl = partial(self._call, index)

    def _call(self, index: int, *args, **kwargs):
        layer = self.layers[index]
        if self.graphed is not None and torch.is_grad_enabled() and layer.training:
            leaves, spec = tree_flatten((args, kwargs))
            if self.calls[index].matches(leaves, spec):
                self.replays += 1
                return self.graphed[index](*self._inputs(index, [x for x in leaves if isinstance(x, torch.Tensor)]))
            self.misses += 1
        elif self.recording:
            self.calls[index] = LayerCall(layer, self.originals[index], args, kwargs)
        return self.originals[index](*args, **kwargs)

    def _inputs(self, index: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The graph copies each input into its own memory before a replay; an input that every layer shares is
        copied once per forward pass (by the first layer that reads it) and given to the others as it is."""
        if index == 0:
            self.filled.clear()
        for k, (tensor, static) in enumerate(zip(tensors, self.statics[index], strict=True)):
            if self.shared[index][k]:
                if self.filled.get(id(static)) is not tensor:
                    with torch.no_grad():
                        static.copy_(tensor)
                    self.filled[id(static)] = tensor
                tensors[k] = static
        return tensors

    @contextmanager
    def record(self):
        self.recording = True
        try:
            yield
        finally:
            self.recording = False

    def capture(self, context=None, make=torch.cuda.make_graphed_callables) -> None:
        """Record the graphs of the recorded calls (the recorded tensors' values as samples), under `context` (the
        training's autocast, without its weight cache). `make` records them (a test passes a stand-in that returns
        the calls as they are, to run the replay path's bookkeeping on a CPU)."""
        if any(call is None for call in self.calls):
            raise RuntimeError("every decoder layer must be called while recording before its graphs can be recorded")
        copies: dict[int, torch.Tensor] = {}  # one copy per recorded tensor: a tensor passed twice (varlen's start
        # offsets for queries and keys) stays one, as dynamo's guards on the compiled layers expect

        def sample(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in copies:
                copies[id(tensor)] = tensor.detach().clone().requires_grad_(tensor.requires_grad)
            return copies[id(tensor)]

        samples = tuple(tuple(sample(t) for t in call.sample) for call in self.calls)
        uses = Counter(id(t) for layer_samples in samples for t in layer_samples)
        self.statics = list(samples)
        # Inputs that need gradients keep the graph's own copy, through which their gradient flows.
        self.shared = [[uses[id(t)] > 1 and not t.requires_grad for t in layer_samples] for layer_samples in samples]
        for call in self.calls:
            del call.sample
        torch.cuda.empty_cache()  # the graphs' memory pool cannot use blocks cached for the steps before
        with context or nullcontext():
            graphed = make(tuple(self.calls), samples, allow_unused_input=True)
        self.graphed = list(graphed)


class GraphedLayers(KeptGradients):
    """Records the layers' calls during the last micro-batch of optimizer step `after_steps` and their graphs right
    after it; the later micro-batches replay them."""

    def __init__(self, after_steps: int = 2) -> None:
        self.after_steps = after_steps
        self.graphs: LayerGraphs | None = None
        self._recording = None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        super().on_train_start(trainer, module)
        self.graphs = LayerGraphs(module.model)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        last_of_step = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if self.graphs.graphed is None and trainer.global_step + 1 >= self.after_steps and last_of_step:
            self._recording = self.graphs.record()
            self._recording.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._recording is not None:
            self._recording.__exit__(None, None, None)
            self._recording = None
            self.graphs.capture(trainer.precision_plugin.forward_context())

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        print(f"layer graphs: {self.graphs.replays} replays, {self.graphs.misses} calls without a graph", flush=True)
