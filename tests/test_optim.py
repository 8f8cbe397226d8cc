"""qlora_lit's 8-bit AdamW steps make exactly bitsandbytes' updates (they update many tensors with one kernel and skip
its per-tensor host wait)."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from qlora_lit.optim import AdamW8bit, PagedAdamW8bit


def lora_like_params(seed: int) -> list[torch.nn.Parameter]:
    """Shapes on both sides of bitsandbytes' 4096-element limit for 8-bit state, 8-bit ones in whole blocks of 256
    (updated together) and one not (5600 elements: alone), and one left without a gradient (the last)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 256), (256, 4), (4, 2048), (1024, 8), (16, 1024), (3, 5), (8, 700), (2, 3)]
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]


def run(optimizer_class, steps: int = 5, resume_after: int | None = None) -> tuple[list[torch.Tensor], list[dict]]:
    """`steps` steps; with `resume_after`, the optimizer is rebuilt from its state dict after that many, as a resumed
    run's is."""
    params = lora_like_params(0)
    optimizer = optimizer_class(params, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        if step == resume_after:
            saved = optimizer.state_dict()
            optimizer = optimizer_class(params, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)
            optimizer.load_state_dict(saved)
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
    assert len(eight_bit) == 4  # the blockwise 8-bit path was exercised, not only 32-bit state


def test_tensors_in_whole_blocks_are_updated_by_one_kernel(monkeypatch):
    calls = {"8bit": 0, "32bit": 0}
    functions = {"8bit": bnb.functional.optimizer_update_8bit_blockwise, "32bit": bnb.functional.optimizer_update_32bit}

    def counted(kind):
        def call(*args, **kwargs):
            calls[kind] += 1
            return functions[kind](*args, **kwargs)

        return call

    monkeypatch.setattr(bnb.functional, "optimizer_update_8bit_blockwise", counted("8bit"))
    monkeypatch.setattr(bnb.functional, "optimizer_update_32bit", counted("32bit"))
    run(AdamW8bit, steps=2)
    # per step: the three 8-bit tensors in whole blocks together, the 8 x 700 one alone; the three 32-bit ones together
    assert calls == {"8bit": 4, "32bit": 2}


@pytest.mark.parametrize("ours", [PagedAdamW8bit, AdamW8bit])
def test_a_resumed_optimizer_continues_as_bitsandbytes_does(ours):
    params, state = run(ours, resume_after=3)
    expected_params, expected_state = run(bnb.optim.AdamW8bit)
    for got, expected in zip(params, expected_params, strict=True):
        assert torch.equal(got, expected)
    for entry, expected in zip(state, expected_state, strict=True):
        for key, value in entry.items():
            assert torch.equal(value, expected[key]) if isinstance(value, torch.Tensor) else value == expected[key]


def test_the_state_dict_holds_copies_not_views_of_the_flat_state():
    params = lora_like_params(0)
    optimizer = AdamW8bit(params, lr=1e-2)
    for param in params[:-1]:
        param.grad = torch.ones_like(param)
    optimizer.step()
    assert optimizer.state[params[3]]["state1"]._base is not None  # grouped: a view into the flat buffer
    tensors = [value for entry in optimizer.state_dict()["state"].values() for value in _tensors(entry)]
    assert tensors and all(tensor._base is None for tensor in tensors)
    saved = optimizer.state_dict()["state"][3]["__bnb_optimizer_quant_state__"]["state1"]
    assert saved.untyped_storage().nbytes() == params[3].numel()  # its own bytes, not the whole buffer's


def _tensors(entry: dict):
    for value in entry.values():
        if isinstance(value, dict):
            yield from _tensors(value)
        elif isinstance(value, torch.Tensor):
            yield value


def test_a_warmup_as_long_as_the_run_is_said():
    from qlora_lit.optim import OptimizerArgs, build_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.warns(UserWarning, match="warmup_steps=10 is not shorter than the run's 10 optimizer steps"):
        build_scheduler(optimizer, OptimizerArgs(warmup_steps=10), 10)


def test_a_tensor_without_a_gradient_in_some_steps_keeps_bitsandbytes_updates_and_one_buffer_per_kind():
    """Its step count falls behind the others', so it leaves their group in those steps and the groups change."""

    def run_intermittent(optimizer_class):
        params = lora_like_params(0)
        optimizer = optimizer_class(params, lr=1e-2, weight_decay=0.01)
        gen = torch.Generator().manual_seed(2)
        for step in range(6):
            for index, param in enumerate(params[:-1]):
                skipped = index in (0, 3) and step % 3 == 1  # a 32-bit one and an 8-bit one of whole blocks
                param.grad = None if skipped else torch.randn(param.shape, generator=gen)
            optimizer.step()
        return params, optimizer

    params, optimizer = run_intermittent(AdamW8bit)
    expected, _ = run_intermittent(bnb.optim.AdamW8bit)
    for got, want in zip(params, expected, strict=True):
        assert torch.equal(got, want)
    assert len(optimizer._flats) <= 2  # the 8-bit and the 32-bit buffers of group 0, however often they changed
