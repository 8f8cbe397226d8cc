"""The compiled decoder layers as a GPU traces them: there the attention is torch's varlen kernel op, which dynamo
and Inductor see through its fake implementation (shapes, strides), where the CPU tests otherwise run the
per-example reference that dynamo never traces into the graph. A CPU stand-in computes the op here (the reference,
its outputs laid out as the kernel's), so the GPU's graph is compiled and run for architectures whose layers differ
the most; the compiled layers with gradient checkpointing give the eager loss and gradients, in one graph.

The stand-in stays registered for the process; only `attention.KERNEL_DEVICES` (patched per test) routes to it."""

from __future__ import annotations

import pytest
import torch
from test_speedups import batch_loss_and_gradients, packed_row
from torch._dynamo.utils import counters
from torch.nn.attention import varlen as varlen_module
from zoo import build_zoo_model

from qlora_lit import attention
from qlora_lit.data.packing import PackingCollator
from qlora_lit.model import LoraArgs, QuantizationArgs, compile_decoder_layers
from qlora_lit.module import QLoRAModule


def window_of(window_size) -> int | None:
    return window_size[0] + 1 if window_size and window_size[0] >= 0 else None


def forward_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, scale=None, window_size=None, *unused):
    out = attention._reference_varlen(q, k, v, cu_q, scale, window_of(window_size))
    return out, torch.zeros(q.shape[1], q.shape[0]), torch.zeros(2, dtype=torch.uint64)


def backward_stand_in(grad, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, is_causal, rng, scale=None, window_size=None):
    _, vjp = torch.func.vjp(
        lambda *qkv: attention._reference_varlen(*qkv, cu_q, scale, window_of(window_size)), q, k, v
    )
    return tuple(torch.empty_like(x).copy_(g) for x, g in zip((q, k, v), vjp(grad), strict=True))  # as it allocates


@pytest.fixture
def kernel_path(monkeypatch):
    for op, stand_in in (
        (varlen_module._varlen_attn, forward_stand_in),
        (varlen_module._varlen_attn_backward, backward_stand_in),
    ):
        if "cpu" not in op._backend_fns:
            op.register_kernel("cpu")(stand_in)
    monkeypatch.setattr(attention, "KERNEL_DEVICES", ("cuda", "cpu"))


@pytest.mark.parametrize("name", ["gpt_neox", "gemma3_text", "qwen3"])
def test_compiled_layers_on_the_kernel_path_give_the_eager_results(kernel_path, tmp_path, name):
    """gpt_neox: one fused qkv projection with biases (its q/k/v are strided views); gemma3_text: sliding and global
    layers, q/k norms; qwen3: q/k norms. Checkpointing is on (the module's default)."""
    path = str(build_zoo_model(name, tmp_path / name))

    def module() -> QLoRAModule:
        torch.manual_seed(0)
        built = QLoRAModule(path, QuantizationArgs(compute_dtype="float32"), LoraArgs(r=4, dropout=0.0))
        built.attn_implementation = attention.NAME
        built.configure_model()
        for lora_b in (p for n, p in built.named_parameters() if "lora_B" in n):
            torch.nn.init.normal_(lora_b, std=0.05, generator=torch.Generator().manual_seed(1))
        return built

    batch = PackingCollator(pad_id=1)([packed_row([40, 30, 20], seed=2)])  # longer than the zoo's window of 32
    eager_loss, eager_grads = batch_loss_and_gradients(module(), batch)
    compiled = module()
    assert compiled.model.is_gradient_checkpointing
    compile_decoder_layers(compiled.model)
    torch._dynamo.reset()
    counters.clear()
    loss, grads = batch_loss_and_gradients(compiled, batch)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys() and grads
    for key, grad in eager_grads.items():
        assert (grads[key] - grad).abs().max() <= 5e-3 * grad.abs().max(), key


def test_compiling_layers_with_adapted_fused_experts_says_they_run_uncompiled(tmp_path, caplog):
    """Qwen3-MoE's experts adapted through peft's target_parameters: peft registers a parametrization in each forward
    pass, which dynamo cannot trace (found with the stand-in above), so the run says so instead of letting a user
    expect compiled speed."""
    module = QLoRAModule(
        str(build_zoo_model("qwen3_moe", tmp_path / "moe")),
        QuantizationArgs(compute_dtype="float32"),
        LoraArgs(r=4, dropout=0.0),
    )
    module.configure_model()
    with caplog.at_level("INFO"):
        compile_decoder_layers(module.model)
    assert "peft adapts the fused experts" in caplog.text and "run uncompiled" in caplog.text
    dense = QLoRAModule(str(build_zoo_model("qwen3", tmp_path / "dense")), QuantizationArgs(compute_dtype="float32"))
    dense.configure_model()
    caplog.clear()
    with caplog.at_level("INFO"):
        compile_decoder_layers(dense.model)
    assert "fused experts" not in caplog.text
