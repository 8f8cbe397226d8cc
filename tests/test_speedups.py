"""Execution settings that change speed, never results: compiled decoder layers, varlen attention, checkpointing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_MODEL
from torch._dynamo.utils import counters
from torch._inductor import config
from transformers import Gemma2Config, Gemma3Config, LlamaConfig

from qlora_lit import attention
from qlora_lit.memory import MicroBatch, activation_bytes, needs_checkpointing
from qlora_lit.model import LoraArgs, QuantizationArgs, compile_decoder_layers
from qlora_lit.module import QLoRAModule


def tiny_module(**settings) -> QLoRAModule:
    module = QLoRAModule(
        TINY_MODEL, quantization=QuantizationArgs(compute_dtype="float32"), lora=LoraArgs(dropout=0.0), **settings
    )
    torch.manual_seed(0)  # LoRA A is drawn at random when the adapters are attached
    module.configure_model()
    for lora_b in (p for name, p in module.named_parameters() if "lora_B" in name):
        torch.nn.init.normal_(lora_b, std=0.05)  # B starts at zero: make the adapters count
    return module


def loss_and_gradients(module: QLoRAModule, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = module(ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in module.named_parameters() if p.grad is not None}


def packed_row(lengths: list[int], seed: int) -> dict[str, list[int]]:
    """A packed row of examples of these lengths (positions restart at each); each first 2 tokens unlabelled."""
    ids = torch.randint(3, 2000, (sum(lengths),), generator=torch.Generator().manual_seed(seed)).tolist()
    positions = [p for length in lengths for p in range(length)]
    labels = [-100 if p < 2 else token for p, token in zip(positions, ids, strict=True)]
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def batch_loss_and_gradients(module: QLoRAModule, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of a collated batch (every key a forward argument) and the gradients it gives, from zero."""
    module.zero_grad()
    loss = module(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def test_compiled_decoder_layers_give_the_eager_loss_and_gradients():
    ids = torch.randint(3, 2000, (2, 24), generator=torch.Generator().manual_seed(1))
    eager_loss, eager_grads = loss_and_gradients(tiny_module(), ids)
    compiled = tiny_module()
    compile_decoder_layers(compiled.model)  # what model.compile does on a GPU
    layers = compiled.model.get_base_model().model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    torch._dynamo.reset()
    counters.clear()
    compiled_loss, compiled_grads = loss_and_gradients(compiled, ids)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # compiled, not run eagerly
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and eager_grads
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert set(compiled.state_dict()) == set(tiny_module().state_dict())  # checkpoints keep their key names


def test_a_row_as_long_as_the_hidden_size_compiles_for_every_length():
    """Packed rows are often exactly pack_length long, and pack_length can equal the hidden size (4096 at 8B): the
    layers compiled for such a row must take the shorter rows that follow without compiling again."""
    module = tiny_module()
    compile_decoder_layers(module.model)
    torch._dynamo.reset()
    counters.clear()
    hidden = module.model.config.hidden_size
    graphs = []
    for length in (hidden, hidden - 8, hidden - 30):
        loss_and_gradients(module, torch.randint(3, 2000, (1, length), generator=torch.Generator().manual_seed(length)))
        graphs.append(counters["frames"]["ok"])  # frames dynamo compiled
    assert graphs[0] >= 1 and graphs == graphs[:1] * 3, graphs  # with duck shaping: [1, 2, 2]


def test_checkpointed_decoder_layers_are_compiled_whole():
    """With gradient checkpointing (lowmem.yaml, and `auto` on smaller GPUs) the layer's checkpointed forward is one
    region for dynamo; a side effect inside it (the `kernels` package's context variable, with newer transformers)
    made dynamo run the whole layer uncompiled, silently. The layers must compile in one graph without a break."""
    module = tiny_module()
    assert module.model.is_gradient_checkpointing
    compile_decoder_layers(module.model)
    torch._dynamo.reset()
    counters.clear()
    loss_and_gradients(module, torch.randint(3, 2000, (1, 24), generator=torch.Generator().manual_seed(4)))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_decoder_layers_are_traced_once_with_no_host_scalars():
    """Dynamic compilation made the layers' Python floats (dropout rate, LoRA scale, norm epsilon) symbolic, and
    dynamo then restarted its analysis of every layer graph to specialise them: the tracing done twice, a part of the
    first step's compile time. They are constants, so the layers are compiled with floats specialised: one attempt.

    A symbolic float also enters the graph as a 0-dim float64 tensor on the host, whatever the model's device: on a
    GPU Inductor compiles C++ kernels for those, and before the first one it probes the host's vector instruction
    sets, building and loading a test program per set in a new Python process, in every process that loads the
    graphs, cached code or not (torch/_inductor/cpu_vec_isa.py). The graphs reach Inductor without such inputs."""
    from torch._dynamo.utils import compilation_time_metrics

    inputs = []
    module = tiny_module(gradient_checkpointing=False)
    compile_decoder_layers(module.model)
    torch._dynamo.reset()
    compilation_time_metrics.clear()
    ids = torch.randint(3, 2000, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch._inductor.config.patch(
        post_grad_custom_post_pass=lambda graph: inputs.extend(graph.find_nodes(op="placeholder"))
    ):
        loss_and_gradients(module, ids)
    attempts = sorted(name for name in compilation_time_metrics if name.startswith("compile_attempt_"))
    assert attempts == ["compile_attempt_0"], attempts
    values = [node.meta["val"] for node in inputs if isinstance(node.meta.get("val"), torch.Tensor)]
    assert values and not [v for v in values if v.dim() == 0 and v.dtype == torch.float64], inputs


def test_decoder_layers_are_compiled_without_matmul_padding():
    """Inductor's matmul-padding pass (GPUs only) compares the symbolic row length with the weights' sizes in torch
    2.11 and so fixed the 8B graphs to rows of exactly 4096 tokens (bench/results/raw/2026-12-07-h100-8b-512-call-d-
    shapes.log): the layers are compiled with it off. The pass does not run on CPUs, so this reads the setting in
    force while Inductor compiles them (fails with torch's default, on)."""
    seen = []
    module = tiny_module()
    compile_decoder_layers(module.model)
    torch._dynamo.reset()
    ids = torch.randint(3, 2000, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch._inductor.config.patch(post_grad_custom_post_pass=lambda graph: seen.append(config.shape_padding)):
        loss_and_gradients(module, ids)
    assert seen and not any(seen), seen


def test_compile_is_skipped_with_a_message_on_a_cpu(caplog):
    with caplog.at_level("INFO"):
        layers = tiny_module(compile=True).model.get_base_model().model.layers
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert "model.compile applies on GPUs only" in caplog.text


def test_varlen_attention_keeps_padded_batches_masked_as_sdpa_does():
    """Validation batches (right padding) and generation (left padding) carry an attention mask and no packed
    positions: `varlen` must give exactly sdpa's logits there, padding never attended."""
    ids = torch.randint(3, 2000, (2, 12), generator=torch.Generator().manual_seed(2))
    right = torch.ones_like(ids)
    right[1, 8:] = 0
    left = torch.ones_like(ids)
    left[1, :4] = 0
    sdpa, varlen = tiny_module(), tiny_module(attn_implementation="varlen")
    with torch.no_grad():
        for mask in (right, left):
            expected = sdpa(ids, attention_mask=mask).logits
            torch.testing.assert_close(varlen(ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)
        generated = {
            name: m.model.generate(input_ids=ids, attention_mask=left, max_new_tokens=5, do_sample=False)
            for name, m in (("sdpa", sdpa), ("varlen", varlen))
        }
    assert torch.equal(generated["varlen"], generated["sdpa"])


LLAMA_8B = LlamaConfig(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, vocab_size=128256
)
GIB = 2**30


def test_varlen_finds_the_sequence_starts_before_the_batch_moves_to_the_gpu(monkeypatch):
    """On a GPU, finding where positions restart would make the host wait for the device every micro-batch: the
    starts are computed on the host in on_before_batch_transfer and the forward uses them as they are."""
    module = tiny_module(attn_implementation="varlen", loss_chunk_tokens=0)
    module.eval()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    batch = {"input_ids": ids, "labels": ids, "position_ids": positions}
    with torch.no_grad():
        expected = module(**batch).logits
    moved = module.on_before_batch_transfer(dict(batch), 0)
    assert moved["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 15, 18]
    assert moved["max_length_q"] == 6 and moved["cu_seq_lens_q"].device.type == "cpu"

    def found_again(position_ids):
        raise AssertionError("sequence starts computed again after the transfer")

    monkeypatch.setattr(attention, "sequence_starts", found_again)
    with torch.no_grad():
        assert torch.equal(module(**moved).logits, expected)
    sdpa = tiny_module(loss_chunk_tokens=0)
    assert "cu_seq_lens_q" not in sdpa.on_before_batch_transfer(dict(batch), 0)  # sdpa: left to its mask


def test_the_activation_estimate_matches_the_measured_8b_peak():
    """docs/PERFORMANCE.md, `packed`: 4096-token rows, full logits, 5.7 GiB of weights, 38.6 GiB peak on an H200."""
    estimate = (5.7 * GIB + activation_bytes(LLAMA_8B, MicroBatch(1, 4096), loss_chunk_tokens=0)) / GIB
    assert 0.9 * 38.6 < estimate < 1.1 * 38.6
    row = MicroBatch(1, 4096)
    assert activation_bytes(LLAMA_8B, row, 1024) < activation_bytes(LLAMA_8B, row, 0)  # chunked logits


def test_the_estimate_counts_eager_attentions_score_matrices_and_the_models_own_full_logits():
    """Gemma 2 takes eager attention (soft-capping), which keeps every layer's heads x width x width weights, and its
    own loss over every position: the estimate had neither, so `auto` left checkpointing off where a 9B at 4096
    tokens needed some 84 GiB more than estimated (measured per entry on the zoo's Gemma 2: 8 bytes)."""
    gemma2_9b = Gemma2Config(
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16, vocab_size=256000
    )
    sdpa, eager = MicroBatch(1, 4096), MicroBatch(1, 4096, eager_attention=True)
    extra = activation_bytes(gemma2_9b, eager, 0) - activation_bytes(gemma2_9b, sdpa, 0)
    assert extra == 4096**2 * 16 * 42 * 8  # 84 GiB
    assert not needs_checkpointing(gemma2_9b, sdpa, 0, 6 * GIB, 80 * GIB)
    assert needs_checkpointing(gemma2_9b, eager, 0, 6 * GIB, 80 * GIB)
    own_loss = MicroBatch(1, 4096, labelled_loss=False)
    assert activation_bytes(gemma2_9b, own_loss, 1024) == activation_bytes(gemma2_9b, sdpa, 0)  # logits not chunked
    assert activation_bytes(gemma2_9b, sdpa, 1024) < activation_bytes(gemma2_9b, sdpa, 0)
    gemma3_4b = Gemma3Config()  # beside a vision tower: the sizes are in its text config (AttributeError before)
    assert activation_bytes(gemma3_4b, sdpa, 0) == activation_bytes(gemma3_4b.get_text_config(), sdpa, 0)


@pytest.mark.parametrize(
    ("tokens", "gpu_gib", "expected"),
    [(4096, 141, False), (4096, 24, True), (8 * 512, 80, False), (4 * 4096, 80, True)],
)
def test_auto_checkpointing_recomputes_only_when_the_activations_would_not_fit(tokens, gpu_gib, expected):
    assert needs_checkpointing(LLAMA_8B, MicroBatch(1, tokens), 0, int(5.7 * GIB), gpu_gib * GIB) is expected


def test_auto_checkpointing_asks_the_gpu_and_the_data_and_stays_off_on_a_cpu(monkeypatch):
    module = tiny_module(gradient_checkpointing="auto")
    assert not module.model.get_base_model().is_gradient_checkpointing  # on the CPU
    base = module.model.get_base_model()
    monkeypatch.setattr(module, "micro_batch_tokens", lambda: 4096)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 1 * GIB)
    for gpu_gib, expected in ((16, False), (0.9, True)):  # the tiny model's 4096 tokens need about 0.07 GiB
        properties = SimpleNamespace(total_memory=int(gpu_gib * GIB))
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, p=properties: p)
        assert module.checkpointing_for(base, torch.device("cuda")) is expected
    monkeypatch.setattr(module, "micro_batch_tokens", lambda: None)
    assert module.checkpointing_for(base, torch.device("cuda")) is True  # nothing to judge by: the safe choice


@pytest.mark.parametrize("window", [None, 32])
def test_the_gpu_varlen_call_gets_half_precision_and_the_window(window, monkeypatch):
    """The flash kernel takes fp16/bf16 only (GPT-NeoX's attention inputs are fp32) and the sliding window as
    (window - 1, 0); the call is checked here with the kernel replaced, as no GPU runs the tests."""
    import torch.nn.attention.varlen as varlen_module

    from qlora_lit.attention import _kernel_varlen

    seen = {}

    def fake_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        seen.update(dtype=q.dtype, window_size=window_size, kv_heads=k.shape[1])
        return torch.zeros_like(q)

    monkeypatch.setattr(varlen_module, "varlen_attn", fake_varlen_attn)
    q, k = torch.randn(10, 4, 8), torch.randn(10, 2, 8)
    out = _kernel_varlen(q, k, k, torch.tensor([0, 6, 10], dtype=torch.int32), 6, None, window)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert seen == {"dtype": torch.bfloat16, "window_size": (window - 1 if window else -1, 0), "kv_heads": 4}
