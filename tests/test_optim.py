"""qlora_lit's 8-bit AdamW steps make exactly bitsandbytes' updates (they only skip its per-tensor host wait)."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from qlora_lit.optim import AdamW8bit, PagedAdamW8bit


def lora_like_params(seed: int) -> list[torch.nn.Parameter]:
    """Shapes on both sides of bitsandbytes' 4096-element limit for 8-bit state, and one left without a gradient."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 256), (256, 4), (4, 2048), (3, 5), (8, 700)]
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]


def run(optimizer_class, steps: int = 5) -> tuple[list[torch.Tensor], list[dict]]:
    params = lora_like_params(0)
    optimizer = optimizer_class(params, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for param in params[:-1]:  # the last one never gets a gradient, as frozen or unused tensors do
            param.grad = torch.randn(param.shape, generator=gen)

        def closure():  # Lightning passes the micro-batch's forward and backward as a closure
            return torch.tensor(3.0)

        assert optimizer.step(closure) == torch.tensor(3.0)
    return [p.detach().clone() for p in params], [optimizer.state[p] for p in params]


@pytest.mark.parametrize(
    ("ours", "theirs"), [(PagedAdamW8bit, bnb.optim.PagedAdamW8bit), (AdamW8bit, bnb.optim.AdamW8bit)]
)
def test_updates_and_state_equal_bitsandbytes(ours, theirs):
    params, state = run(ours)
    expected_params, expected_state = run(theirs)
    for got, expected in zip(params, expected_params, strict=True):
        assert torch.equal(got, expected)
    assert not torch.equal(params[0], lora_like_params(0)[0])  # it did train
    assert torch.equal(params[-1], lora_like_params(0)[-1])  # no gradient, no update
    for entry, expected in zip(state, expected_state, strict=True):
        assert entry.keys() == expected.keys()
        for key, value in entry.items():
            assert torch.equal(value, expected[key]) if isinstance(value, torch.Tensor) else value == expected[key]
    assert not state[-1]
    eight_bit = [entry for entry in state if entry and entry["state1"].dtype == torch.uint8]
    assert len(eight_bit) == 1  # the 8 x 700 tensor: the blockwise 8-bit path was exercised, not only 32-bit state


def test_a_warmup_as_long_as_the_run_is_said():
    from qlora_lit.optim import OptimizerArgs, build_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.warns(UserWarning, match="warmup_steps=10 is not shorter than the run's 10 optimizer steps"):
        build_scheduler(optimizer, OptimizerArgs(warmup_steps=10), 10)
