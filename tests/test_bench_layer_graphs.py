"""bench/layer_graphs.py: intercepting the decoder layers' calls changes nothing until graphs are recorded, a
recorded call is reproduced from its tensors, a call of other shapes or arguments is not taken for it, and on a GPU
the graphed layers give the gradients of the layers without graphs over accumulated micro-batches."""

from __future__ import annotations

import pytest
import torch
from test_bench_cuda_graphs import accumulated_gradients
from test_speedups import batch_loss_and_gradients, packed_row, tiny_module
from torch.utils._pytree import tree_flatten

from bench.cuda_graphs import StaticShapes, allocate_gradients
from bench.layer_graphs import LayerGraphs
from qlora_lit.data.packing import PackingCollator
from qlora_lit.model import compile_decoder_layers, decoder_layers

SHAPES = StaticShapes(PackingCollator(pad_id=0, pad_to_multiple_of=48), width=48, offsets=8)


def static_batches() -> list[dict]:
    return [SHAPES([packed_row(lengths, seed=seed)]) for seed, lengths in enumerate(([9, 13, 6], [30, 2], [5] * 6))]


def test_intercepted_layers_record_their_calls_and_train_as_before():
    batch = static_batches()[0]
    loss, grads = batch_loss_and_gradients(tiny_module(attn_implementation="varlen"), batch)
    module = tiny_module(attn_implementation="varlen")
    graphs = LayerGraphs(module.model)
    outputs = []
    decoder_layers(module.model)[1].register_forward_hook(lambda layer, args, output: outputs.append(output.detach()))
    with graphs.record():
        got_loss, got_grads = batch_loss_and_gradients(module, batch)
    torch.testing.assert_close(got_loss, loss, rtol=0, atol=0)
    assert got_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=0, atol=0, msg=name)
    layers = decoder_layers(module.model)
    assert len(graphs.calls) == len(layers) >= 2 and all(call is not None for call in graphs.calls)
    assert graphs.replays == graphs.misses == 0
    call = graphs.calls[1]
    hidden = call.sample[0]
    assert hidden.shape == (1, 48, module.model.config.hidden_size) and hidden.requires_grad
    assert len(outputs) == 1
    with torch.no_grad():
        again = call(*call.sample)  # the recorded call, rebuilt from its tensors
    torch.testing.assert_close(again, outputs[0], rtol=0, atol=0)


def test_a_call_of_other_shapes_or_arguments_does_not_match_the_record():
    module = tiny_module(attn_implementation="varlen")
    graphs = LayerGraphs(module.model)
    with graphs.record(), torch.no_grad():
        module(**static_batches()[0])
    call = graphs.calls[0]
    leaves, spec = tree_flatten(call.arguments(*call.sample))
    assert call.matches(leaves, spec)
    longer = [torch.zeros(1, 64, leaf.shape[-1]) if leaf is leaves[0] else leaf for leaf in leaves]
    assert not call.matches(longer, spec)
    ints = [i for i, leaf in enumerate(leaves) if isinstance(leaf, int) and not isinstance(leaf, bool)]
    assert ints  # the longest example (max_length_q)
    other = list(leaves)
    other[ints[0]] += 1
    assert not call.matches(other, spec)


def test_the_replay_path_gives_every_layer_this_micro_batchs_inputs():
    """The replay path's bookkeeping on a CPU, the graphs' recording replaced by a stand-in that returns the recorded
    calls as they are: each call of a later micro-batch matches its record, the inputs all layers share (rotary
    tables, start offsets) are copied into the shared graph inputs once and read from there, and the losses and
    gradients are those of the layers called directly, micro-batch after micro-batch (a stale shared input would
    give the first micro-batch's positions to the second)."""
    batches = static_batches()
    reference, module = tiny_module(attn_implementation="varlen"), tiny_module(attn_implementation="varlen")
    graphs = LayerGraphs(module.model)
    with graphs.record():
        batch_loss_and_gradients(module, batches[0])
    graphs.capture(make=lambda calls, samples, **options: calls)
    layers = len(decoder_layers(module.model))
    assert any(any(shared) for shared in graphs.shared) and not any(graphs.shared[index][0] for index in range(layers))
    for round_, batch in enumerate(batches[1:] + batches[:1]):
        loss, grads = batch_loss_and_gradients(reference, batch)
        got_loss, got_grads = batch_loss_and_gradients(module, batch)
        assert graphs.replays == layers * (round_ + 1) and graphs.misses == 0
        torch.testing.assert_close(got_loss, loss, rtol=0, atol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_graphed_layers_accumulate_the_gradients_of_the_layers_without_graphs(compiled):
    """On a GPU: after one micro-batch recorded, three rounds of three accumulated micro-batches replay every layer's
    graphs and give the gradients of the same layers without graphs."""
    batches = static_batches()
    reference, graphed = (tiny_module(attn_implementation="varlen", keep_dequantized=True).cuda() for _ in range(2))
    if compiled:
        compile_decoder_layers(reference.model)
        compile_decoder_layers(graphed.model)
    graphs = LayerGraphs(graphed.model)
    allocate_gradients(graphed)  # as KeptGradients does
    with graphs.record():
        accumulated_gradients(graphed, batches[:1])
    graphs.capture()
    expected = accumulated_gradients(reference, batches)
    assert expected
    layers = len(decoder_layers(graphed.model))
    for round_ in range(3):
        got = accumulated_gradients(graphed, batches)
        assert graphs.replays == layers * len(batches) * (round_ + 1) and graphs.misses == 0
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_compiled_layers_draw_new_dropout_masks_at_every_replay():
    """On a GPU, with LoRA dropout: replaying the graphs of the compiled layers on the same batch gives a new loss each
    time (new masks), near the loss without dropout, as the layers without graphs do."""
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in static_batches()[0].items()}
    module = tiny_module(attn_implementation="varlen", keep_dequantized=True).cuda()
    for lora in (m for m in module.model.modules() if hasattr(m, "lora_dropout")):
        lora.lora_dropout["default"] = torch.nn.Dropout(0.3)  # tiny_module has none
    compile_decoder_layers(module.model)
    graphs = LayerGraphs(module.model)
    allocate_gradients(module)  # as KeptGradients does
    with graphs.record():
        module(**batch).loss.backward()
    graphs.capture()
    replayed = []
    for _ in range(4):
        loss = module(**batch).loss
        loss.backward()
        replayed.append(loss.item())
    assert graphs.replays == 4 * len(decoder_layers(module.model)) and graphs.misses == 0
    module.eval()  # no dropout, and no graphs (they were recorded in training)
    with torch.no_grad():
        plain = module(**batch).loss.item()
    assert len(set(replayed)) == 4, replayed
    assert all(abs(loss - plain) < 0.5 * abs(plain) for loss in replayed), (replayed, plain)
