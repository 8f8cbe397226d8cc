"""bench/one_graph.py's experiment: with layer 0's input needing a gradient, every decoder layer runs one compiled
graph (two without), and the adapters' gradients stay the same."""

from __future__ import annotations

import torch
from test_speedups import loss_and_gradients, tiny_module
from torch._dynamo.utils import counters

from bench.one_graph import OneLayerGraph


def compiled_run(one_graph: bool) -> tuple[int, dict[str, torch.Tensor]]:
    module = tiny_module(gradient_checkpointing=False)
    if one_graph:
        OneLayerGraph().on_fit_start(None, module)
    for layer in module.model.get_base_model().model.layers:
        layer.compile(backend="aot_eager", dynamic=True)  # dynamo's graphs and guards, without Inductor's minutes
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(3, 2000, (1, 24), generator=torch.Generator().manual_seed(6))
    _, grads = loss_and_gradients(module, ids)
    return counters["stats"]["unique_graphs"], grads


def test_layer_zero_needing_a_gradient_leaves_one_graph_and_the_same_gradients():
    graphs, grads = compiled_run(one_graph=False)
    one, one_grads = compiled_run(one_graph=True)
    assert (graphs, one) == (2, 1)
    assert one_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(one_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
