"""bench/lora_reduction.py's experiment: LoRA A as an elementwise product and a sum gives the loss and gradients of
peft's matrix product, eager and compiled, and the product's result under bf16 autocast."""

from __future__ import annotations

import torch
from test_speedups import loss_and_gradients, tiny_module
from torch import nn

from bench.lora_reduction import ReductionLinear, reduce_lora_a
from qlora_lit.model import compile_decoder_layers


def test_reduced_lora_a_gives_the_products_loss_and_gradients():
    ids = torch.randint(3, 2000, (2, 20), generator=torch.Generator().manual_seed(11))
    plain, reduced, compiled = (tiny_module(gradient_checkpointing=False) for _ in range(3))
    assert reduce_lora_a(reduced.model) == reduce_lora_a(compiled.model) == 2 * 7  # two layers of seven projections
    compile_decoder_layers(compiled.model)
    torch._dynamo.reset()
    loss, grads = loss_and_gradients(plain, ids)
    for module in (reduced, compiled):
        other_loss, other_grads = loss_and_gradients(module, ids)
        torch.testing.assert_close(other_loss, loss, rtol=1e-5, atol=1e-6)
        assert other_grads.keys() == grads.keys() and grads
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert {n for n, _ in reduced.named_parameters()} == {n for n, _ in plain.named_parameters()}


def test_under_bf16_autocast_it_rounds_like_the_product():
    linear = nn.Linear(256, 4, bias=False)
    reduction = ReductionLinear(256, 4, bias=False)
    reduction.load_state_dict(linear.state_dict())
    x = torch.randn(32, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = linear(x), reduction(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)  # bf16 output: one rounding step apart at most
