"""bench/cuda_graphs.py's fixed shapes (rows padded to the pack length, start offsets padded with empty examples,
the pack length as the longest example) give the loss and gradients of the batch as packed without them."""

from __future__ import annotations

import pytest
import torch
from test_speedups import batch_loss_and_gradients, packed_row, tiny_module

from bench.cuda_graphs import StaticShapes
from qlora_lit.data.packing import PackingCollator


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
