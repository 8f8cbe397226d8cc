"""Where qlora_lit keeps its own copy of something a library has, the library's side is pinned here: when the library
changes, these fail and say what to look at again (the copy may then be wrong, or no longer needed)."""

from __future__ import annotations

import ast
import contextlib
import inspect
import textwrap

import bitsandbytes as bnb
import pytest
import torch
from lightning.fabric.utilities.throughput import get_available_flops

from qlora_lit.flops import peak_tflops
from qlora_lit.optim import BLOCK, AdamW8bit, PagedAdamW8bit, _GroupedStep


def control_flow_and_calls(function) -> list[str]:
    """The loops, branches and calls of a function's body in source order: the shape of its code."""
    shape = []

    class Walker(ast.NodeVisitor):
        def visit_Call(self, node: ast.Call) -> None:
            function = node.func
            if isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name):
                shape.append(f"{function.value.id}.{function.attr}")
            elif isinstance(function, ast.Name):
                shape.append(function.id)
            self.generic_visit(node)

        def visit_For(self, node: ast.For) -> None:
            shape.append("for")
            self.generic_visit(node)
            shape.append("end for")

        def visit_If(self, node: ast.If) -> None:
            shape.append("if")
            self.generic_visit(node)
            shape.append("end if")

    for statement in ast.parse(textwrap.dedent(inspect.getsource(function))).body[0].body:
        Walker().visit(statement)
    return shape


def test_bitsandbytes_8bit_step_is_the_loop_qlora_lit_copies():
    """qlora_lit.optim re-implements bitsandbytes' Optimizer8bit.step: tensors updated together, without its host wait
    after every tensor (tests/test_optim.py checks the updates are bit-identical). If this fails, bitsandbytes' step
    changed: bring its new loop into _GroupedStep (or drop the copy if bitsandbytes now does both)."""
    theirs = inspect.unwrap(bnb.optim.optimizer.Optimizer8bit.step)
    # torch wraps a class's `step` (profiling hooks) once an optimizer of it is made: compare what is wrapped
    assert (
        inspect.unwrap(bnb.optim.PagedAdamW8bit.step) is theirs and inspect.unwrap(bnb.optim.AdamW8bit.step) is theirs
    )
    loop = ["for", "enumerate", "for", "enumerate", "if", "end if", "if"]
    setup = ["if", "torch.enable_grad", "closure", "end if", "if", "self.check_overrides", "self.to_gpu", "end if"]
    assert control_flow_and_calls(theirs) == [
        *setup,
        *[*loop, "len", "self.init_state", "end if", "self.prefetch_state", "self.update_step", "sync_gpu"],
        *["end for", "end for", "if", "sync_gpu", "end if"],
    ]
    ours = inspect.unwrap(_GroupedStep.step)
    assert inspect.unwrap(PagedAdamW8bit.step) is ours and inspect.unwrap(AdamW8bit.step) is ours


def test_bitsandbytes_8bit_state_is_quantized_in_blocks_of_256():
    """_GroupedStep updates tensors of whole blocks together: the block is bitsandbytes' (one absmax per 256)."""
    param = torch.nn.Parameter(torch.zeros(20 * BLOCK + 1))  # over the 4096 elements of 8-bit state
    optimizer = bnb.optim.AdamW8bit([param])
    optimizer.init_state(optimizer.param_groups[0], param, 0, 0)
    assert BLOCK == 256 and optimizer.state[param]["absmax1"].numel() == 21


@pytest.mark.parametrize(
    ("device_name", "lightnings", "agrees"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4, True),  # 989 in qlora_lit's table
        ("NVIDIA H100 PCIe", 756.0, True),
        ("NVIDIA A100-SXM4-80GB", 312.0, True),
        ("NVIDIA H200", None, False),  # Lightning knows "H200 SXM1"/"NVL1" names only, with the sparse figures
        ("NVIDIA GH200 480GB", None, False),
        ("NVIDIA B200", None, False),
        ("NVIDIA L40S", 121.0, False),  # read as an L4
        ("NVIDIA H100 NVL", 1978.8, False),  # the sparse figure
    ],
)
def test_lightnings_peak_flops_table_and_why_qlora_lit_keeps_its_own(device_name, lightnings, agrees, monkeypatch):
    """Lightning's get_available_flops agrees with qlora_lit.flops where both know a GPU, lacks the H200, GH200 and
    B200, and reads the L40S and H100 NVL otherwise; it also needs a CUDA device, where qlora_lit looks up a name.
    If this fails, Lightning's table changed: it may now do what PEAK_BF16_TFLOPS does."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    with pytest.warns(UserWarning, match="FLOPs not found") if lightnings is None else contextlib.nullcontext():
        flops = get_available_flops(torch.device("cuda"), torch.bfloat16)
    assert (None if flops is None else flops / 1e12) == lightnings
    ours = peak_tflops(device_name)
    assert ours is not None
    assert (lightnings is not None and ours == pytest.approx(lightnings, rel=1e-3)) is agrees
