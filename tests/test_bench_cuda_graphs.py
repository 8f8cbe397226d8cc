"""bench/cuda_graphs.py's fixed shapes (rows padded to the pack length, start offsets padded with empty examples,
the pack length as the longest example) give the loss and gradients of the batch as packed without them, and its
gradients stay in tensors of their own across micro-batches and steps (a CUDA graph's outputs are overwritten)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import SAMPLE_DATA, TINY_MODEL, cpu_trainer
from test_speedups import batch_loss_and_gradients, packed_row, tiny_module

from bench.cuda_graphs import KeptGradients, StaticShapes, allocate_gradients, graph_decoder_layers
from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.data.packing import PackingCollator
from qlora_lit.model import LoraArgs, QuantizationArgs, compile_decoder_layers
from qlora_lit.module import QLoRAModule


def test_fixed_shapes_give_the_loss_and_gradients_of_the_packed_batch():
    module = tiny_module(attn_implementation="varlen")
    rows = [packed_row([9, 13, 6], seed=1)]
    packed = PackingCollator(pad_id=0)(rows)
    fixed = StaticShapes(PackingCollator(pad_id=0, pad_to_multiple_of=48), width=48, offsets=8)(rows)
    assert fixed["input_ids"].shape == (1, 48) and fixed["max_length_q"] == 48
    assert fixed["cu_seq_lens_q"].tolist() == [0, 9, 22, 28, 48, 48, 48, 48]  # the padding, then empty examples
    loss, grads = batch_loss_and_gradients(module, packed)
    fixed_loss, fixed_grads = batch_loss_and_gradients(module, fixed)
    torch.testing.assert_close(fixed_loss, loss, rtol=1e-6, atol=1e-6)
    assert fixed_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(fixed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_fixed_shapes_refuse_rows_they_cannot_hold():
    rows = [packed_row([9, 13, 6], seed=2)]
    with pytest.raises(ValueError, match="rows of 32 tokens, not 48"):
        StaticShapes(PackingCollator(pad_id=0), width=48, offsets=8)(rows)
    with pytest.raises(ValueError, match="4 examples in a micro-batch, more than the 3 planned"):
        StaticShapes(PackingCollator(pad_id=0, pad_to_multiple_of=48), width=48, offsets=4)(rows)


class GradientAddresses(L.Callback):
    """The address of every trainable parameter's gradient at each optimizer step."""

    def __init__(self) -> None:
        self.seen: list[dict[str, int]] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.seen.append({n: p.grad.data_ptr() for n, p in module.named_parameters() if p.requires_grad})


def fit_adapter(root, callbacks: list) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    module = QLoRAModule(TINY_MODEL, quantization=QuantizationArgs(compute_dtype="float32"), lora=LoraArgs(r=4))
    data = KoAlpacaDataModule(SAMPLE_DATA, TINY_MODEL, max_length=64, batch_size=2, val_size=2)
    trainer = cpu_trainer(root, 3, callbacks, accumulate_grad_batches=2, limit_val_batches=0)
    trainer.fit(module, data)
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_kept_gradients_are_added_into_in_place_and_train_as_before(tmp_path):
    addresses = GradientAddresses()
    kept = fit_adapter(tmp_path / "kept", [KeptGradients(), addresses])
    plain = fit_adapter(tmp_path / "plain", [])
    assert len(addresses.seen) == 3 and all(seen == addresses.seen[0] for seen in addresses.seen)
    assert kept.keys() == plain.keys() and any(bool(w.any()) for n, w in kept.items() if "lora_B" in n)
    for name, weight in plain.items():
        torch.testing.assert_close(kept[name], weight, rtol=0, atol=0, msg=name)


def accumulated_gradients(module: QLoRAModule, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Gradients of several micro-batches added up in the parameters' own `.grad` tensors, as in training."""
    for param in module.parameters():
        if param.grad is not None:
            param.grad.zero_()
    for batch in batches:
        torch.compiler.cudagraph_mark_step_begin()
        on_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        module(**on_gpu).loss.backward()
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_layers_accumulate_the_gradients_of_the_compiled_layers():
    """On a GPU: the layers under CUDA graphs, over three accumulated micro-batches and three rounds (Inductor's
    warm-up run, the recording, then replays), give the gradients of the layers compiled without graphs. With the
    weights kept dequantized, as the bench's graphed variants run them (call g: with 4-bit layers torch's CUDA-graph
    trees stop in a backward, "an input tensor deallocate during graph recording")."""
    shapes = StaticShapes(PackingCollator(pad_id=0, pad_to_multiple_of=48), width=48, offsets=8)
    batches = [shapes([packed_row(lengths, seed=seed)]) for seed, lengths in enumerate(([9, 13, 6], [30, 2], [5] * 6))]
    reference, graphed = (tiny_module(attn_implementation="varlen", keep_dequantized=True).cuda() for _ in range(2))
    compile_decoder_layers(reference.model)
    graph_decoder_layers(graphed.model)
    allocate_gradients(graphed)  # as KeptGradients does
    expected = accumulated_gradients(reference, batches)
    assert expected
    for _ in range(3):
        got = accumulated_gradients(graphed, batches)
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_a_bound_on_the_longest_example_cuts_the_padding_and_keeps_the_loss():
    module = tiny_module(attn_implementation="varlen")
    rows = [packed_row([9, 13, 6], seed=3), packed_row([12, 4], seed=4)]
    packed = PackingCollator(pad_id=0)(rows)
    shapes = StaticShapes(PackingCollator(pad_id=0, pad_to_multiple_of=48), width=48, offsets=12, longest=13)
    fixed = shapes(rows)
    assert fixed["max_length_q"] == 13
    # Row 1: its examples, then 20 tokens of padding in pieces of at most 13; row 2 the same from token 48.
    assert fixed["cu_seq_lens_q"].tolist() == [0, 9, 22, 28, 41, 48, 60, 64, 77, 90, 96, 96]
    loss, grads = batch_loss_and_gradients(module, packed)
    fixed_loss, fixed_grads = batch_loss_and_gradients(module, fixed)
    torch.testing.assert_close(fixed_loss, loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(fixed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="an example of 13 tokens, longer than the 12 planned"):
        StaticShapes(PackingCollator(pad_id=0, pad_to_multiple_of=48), width=48, offsets=12, longest=12)(rows)
